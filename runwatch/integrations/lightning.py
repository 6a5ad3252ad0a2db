"""PyTorch Lightning: `Trainer(logger=RunwatchLogger(experiment_name="mnist"))`."""

from __future__ import annotations

from typing import Any, Mapping

try:
    from lightning.pytorch.loggers.logger import Logger
except ImportError:  # the older package name
    from pytorch_lightning.loggers.logger import Logger

from ._common import LazyTarget


class RunwatchLogger(LazyTarget, Logger):
    """A Lightning logger: `log_metrics` with Lightning's step, `log_hyperparams` as properties (flattened;
    odd values as text, never an error), `finalize` completes the run, or fails it when Lightning says
    "failed" (an exception in fit). With several ranks every rank logs to its own child run by default
    (`per_rank=False`: rank 0 alone); see runwatch/integrations/_common.py for which run is used."""

    def __init__(self, experiment_name: str = "lightning", run: Any = None, display_name: str | None = None,
                 per_rank: bool = True, complete: bool | None = None):
        super().__init__()
        self._args = dict(run=run, experiment_name=experiment_name, display_name=display_name, per_rank=per_rank,
                          complete=complete)
        self._experiment_name = experiment_name
        self._target = None

    @property
    def experiment(self) -> Any:
        """The runwatch Run this rank logs to."""
        return self.target.run

    @property
    def name(self) -> str:
        return self._experiment_name

    @property
    def version(self) -> str:
        return self.target.run.id

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.target.log(k, v, step=step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.target.params(params)

    def save(self) -> None:
        if self._target is not None:
            self._target.run.flush(0.0)

    def finalize(self, status: str) -> None:
        if self._target is None:
            return
        if status in ("failed", "interrupted"):
            self._target.finish(failed=f"Lightning ended the fit: {status}")
        else:
            self._target.finish()

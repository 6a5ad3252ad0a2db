"""XGBoost: `xgb.train(..., callbacks=[RunwatchCallback(experiment_name="boosting")])`."""

from __future__ import annotations

from typing import Any

import xgboost

from ._common import Target


class RunwatchCallback(xgboost.callback.TrainingCallback):
    """Every evaluation result of every iteration as `<data>-<metric>` (XGBoost's own names, step = the
    iteration); the booster's parameters as properties; completes the run after training."""

    def __init__(self, experiment_name: str = "xgboost", run: Any = None, display_name: str | None = None,
                 params: Any = None, per_rank: bool = True, complete: bool | None = None):
        super().__init__()
        self.target = Target(run=run, experiment_name=experiment_name, display_name=display_name,
                             per_rank=per_rank, complete=complete)
        if params is not None:
            self.target.params(params, "params")

    @property
    def run(self) -> Any:
        return self.target.run

    def after_iteration(self, model, epoch: int, evals_log) -> bool:
        for data, metrics in evals_log.items():
            for metric, values in metrics.items():
                value = values[-1]
                self.target.log(f"{data}-{metric}", value[0] if isinstance(value, tuple) else value, step=epoch)
        return False

    def after_training(self, model):
        self.target.finish()
        return model

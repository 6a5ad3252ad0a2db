"""Keras 3: `model.fit(..., callbacks=[RunwatchCallback(experiment_name="mnist")])`."""

from __future__ import annotations

from typing import Any

import keras

from ._common import LazyTarget


class RunwatchCallback(LazyTarget, keras.callbacks.Callback):
    """Epoch metrics (step = epoch), batch metrics every `log_every_n_batches` batches as `batch/<name>` (step
    = the batch's number since training began; 0: none), the fit's parameters and the optimizer's config as
    properties; the run is completed at the end of fit, failed if it raises."""

    def __init__(self, experiment_name: str = "keras", run: Any = None, display_name: str | None = None,
                 log_every_n_batches: int = 0, per_rank: bool = True, complete: bool | None = None):
        super().__init__()
        self._args = dict(run=run, experiment_name=experiment_name, display_name=display_name, per_rank=per_rank,
                          complete=complete)
        self.every = int(log_every_n_batches)
        self._target = None
        self._batches = 0

    def on_train_begin(self, logs=None):
        self.target.params(dict(self.params or {}), "fit")
        opt = getattr(self.model, "optimizer", None)
        if opt is not None:
            try:
                self.target.params(opt.get_config(), "optimizer")
            except Exception:
                pass

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self.every and self._batches % self.every == 0:
            for k, v in (logs or {}).items():
                self.target.log(f"batch/{k}", v, step=self._batches)

    def on_epoch_end(self, epoch, logs=None):
        for k, v in (logs or {}).items():
            self.target.log(k, v, step=epoch)

    def on_train_end(self, logs=None):
        self.target.finish()

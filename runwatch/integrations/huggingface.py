"""transformers' Trainer: `Trainer(..., callbacks=[RunwatchCallback(experiment_name="bert")])`.

transformers has no hook for a training that raises: the callback fails its run when the exception ends the
script (sys.excepthook), or use it as a context manager around `trainer.train()` (notebooks)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ._common import LazyTarget


class RunwatchCallback(LazyTarget, TrainerCallback):
    """`on_train_begin`: TrainingArguments and the model's config as properties (`args.*`, `model.*`);
    `on_log`: every numeric entry, step = the global step; `on_train_end`: completes the run."""

    def __init__(self, experiment_name: str = "huggingface", run: Any = None, display_name: str | None = None,
                 per_rank: bool = True, complete: bool | None = None):
        self._args = dict(run=run, experiment_name=experiment_name, display_name=display_name, per_rank=per_rank,
                          complete=complete)
        self._target = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        t = self.target
        try:
            t.params(args.to_dict(), "args")
        except Exception:
            t.params(vars(args), "args")
        config = getattr(model, "config", None)
        if config is not None:
            t.params(config, "model")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for k, v in (logs or {}).items():
            self.target.log(k, v, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.target.finish()

    def __enter__(self) -> "RunwatchCallback":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            self.target.finish(failed=exc)
        return False

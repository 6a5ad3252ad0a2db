"""LightGBM: `lgb.train(..., callbacks=[RunwatchCallback(experiment_name="boosting")])`."""

from __future__ import annotations

from typing import Any

from ._common import Target


class RunwatchCallback:
    """Every evaluation result of every iteration as `<data>-<metric>` (LightGBM's names; in `lgb.cv` the mean,
    with `-stdv` beside it), step = the iteration; the parameters as properties; completes the run after the
    last iteration; LightGBM has no end hook, so a training that stopped early is completed when the process
    ends (or call `finish()`), and one that raised is failed."""

    order = 20
    before_iteration = False

    def __init__(self, experiment_name: str = "lightgbm", run: Any = None, display_name: str | None = None,
                 per_rank: bool = True, complete: bool | None = None):
        self.target = Target(run=run, experiment_name=experiment_name, display_name=display_name,
                             per_rank=per_rank, complete=complete)
        self.target.at_exit = "complete"  # early stopping ends lgb.train without telling its callbacks
        self._params_done = False

    @property
    def run(self) -> Any:
        return self.target.run

    def __call__(self, env) -> None:
        if not self._params_done:
            self._params_done = True
            self.target.params(dict(env.params or {}), "params")
        for item in env.evaluation_result_list or ():
            data, name, value = item[0], item[1], item[2]
            self.target.log(f"{data}-{name}", value, step=env.iteration)
            if len(item) == 5:
                self.target.log(f"{data}-{name}-stdv", item[4], step=env.iteration)
        if env.iteration + 1 >= env.end_iteration:
            self.target.finish()

    def finish(self) -> None:
        self.target.finish()

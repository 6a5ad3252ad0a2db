"""What every integration shares: which run to log to, hyperparameters as properties, failing the run."""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import warnings
from typing import Any, Mapping

#: A property value is cut to this many characters (a model config can hold long lists).
MAX_PARAM_CHARS = 4000


class Target:
    """The run an integration logs to, and whether it owns it (then it completes or fails it).

    - `run` given: that run; owned only when `complete=True`.
    - in a process the launcher started (a submitted run): with several ranks, each rank logs to its own child
      run `<run>_rank<r>` (`per_rank=True`, the default: cross-rank views are what runwatch is for), or rank 0
      alone to the submitted run (`per_rank=False`; the other ranks log nothing); with one process, the
      submitted run itself. The launcher completes the submitted run; the integration completes the children.
    - elsewhere: a new interactive run in `experiment_name`, owned.
    """

    def __init__(self, run: Any = None, experiment_name: str = "default", display_name: str | None = None,
                 per_rank: bool = True, complete: bool | None = None):
        from runwatch import Experiment, Run, Workspace

        self.rank = int(os.environ.get("RANK", "0") or 0)
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.active = True
        if run is not None:
            self.run, self.owned = run, bool(complete)
        elif os.environ.get("RUNWATCH_RUN_ID"):
            parent = Run.get_context()
            if world > 1 and per_rank:
                self.run = parent.child_run(name=display_name or f"rank-{self.rank}",
                                            run_id=f"{parent.id}_rank{self.rank}")
                self.run.tag("rank", str(self.rank))
                self.owned = True if complete is None else complete
            else:
                self.run, self.owned = parent, bool(complete)
                self.active = self.rank == 0 or world == 1
        else:
            exp = Experiment(Workspace.from_config(), experiment_name)
            self.run = exp.start_logging(display_name=display_name)
            self.owned = True if complete is None else complete
        self.done = False
        #: what the end of the process does to a run left open: "fail" (the training's end hook never ran),
        #: or "complete" where a framework ends training without one (LightGBM's early stopping)
        self.at_exit = "fail"
        if self.owned:
            _OPEN.add(self)
            _install_hooks()

    def log(self, name: str, value: Any, step: int | None = None) -> None:
        """A number (a 0-d tensor or numpy scalar too); anything else is left out, never raised."""
        if not self.active:
            return
        v = number(value)
        if v is not None:
            self.run.log(name, v, step=step)

    def params(self, params: Any, prefix: str = "") -> None:
        if self.active:
            add_properties(self.run, flatten(params, prefix))

    def finish(self, failed: BaseException | str | None = None) -> None:
        if self.done:
            return
        self.done = True
        _OPEN.discard(self)
        if not self.owned:
            self.run.flush()
            return
        if failed is None:
            self.run.complete()
        else:
            message = failed if isinstance(failed, str) else f"{type(failed).__name__}: {failed}"
            self.run.fail(error_details=message)


class LazyTarget:
    """The integration's Target, made on first use in the process that logs (a framework may start its ranks
    itself after the callback was made): `_args` are Target's arguments."""

    _args: dict[str, Any]
    _target: "Target | None" = None

    @property
    def target(self) -> Target:
        if self._target is None:
            self._target = Target(**self._args)
        return self._target

    @property
    def run(self) -> Any:
        """The runwatch Run this process logs to."""
        return self.target.run


def number(value: Any) -> float | int | bool | None:
    """A Python number from a number, a numpy scalar or a one-element tensor; None for anything else."""
    if isinstance(value, (bool, int, float)):
        return value
    item = getattr(value, "item", None)
    if not callable(item):
        return None
    try:
        numel = getattr(value, "numel", None)
        if callable(numel) and numel() != 1:
            return None
        size = getattr(value, "size", 1)
        if not callable(size) and size != 1:
            return None
        v = item()
    except Exception:
        return None
    return v if isinstance(v, (bool, int, float)) else None


def flatten(params: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings, namespaces and dataclasses as `a.b.c` keys; every value as text (never raises)."""
    out: dict[str, str] = {}

    def walk(value: Any, key: str, depth: int) -> None:
        if depth > 8:
            out[key] = _text(value)
            return
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}
        elif hasattr(value, "to_dict") and callable(value.to_dict) and not isinstance(value, Mapping):
            try:
                value = value.to_dict()
            except Exception:
                pass
        elif not isinstance(value, Mapping) and hasattr(value, "__dict__") and type(value).__module__ in (
                "argparse", "types"):
            value = vars(value)
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k), depth + 1)
        elif key:
            out[key] = _text(value)

    try:
        walk(params, prefix.rstrip("."), 0)
    except Exception as exc:  # an odd object: said, never raised into training
        warnings.warn(f"runwatch: some hyperparameters could not be read ({type(exc).__name__}: {exc})")
    return out


def _text(value: Any) -> str:
    try:
        s = value if isinstance(value, str) else repr(value)
    except Exception:
        s = f"<{type(value).__name__}>"
    return s[:MAX_PARAM_CHARS]


def add_properties(run: Any, props: Mapping[str, str]) -> None:
    """Add what the run does not have yet (properties are immutable); never raises into training."""
    from runwatch.core.names import INTERNAL_PREFIX

    have = run.properties
    new = {k[:255]: v for k, v in props.items() if k[:255] not in have and not k.startswith(INTERNAL_PREFIX)}
    if not new:
        return
    try:
        run.add_properties(new)
    except Exception as exc:
        warnings.warn(f"runwatch: hyperparameters not recorded: {exc}")


# -- a training that raises fails its run --------------------------------------------------------
_OPEN: set[Target] = set()
_HOOKED = False
_LOCK = threading.Lock()


def _install_hooks() -> None:
    """An exception that ends the script fails the runs integrations opened (frameworks have no failure hook
    everywhere); a script that ends without the framework's end hook leaves them failed too, with that said."""
    global _HOOKED
    with _LOCK:
        if _HOOKED:
            return
        _HOOKED = True
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        fail_open(exc)
        previous(exc_type, exc, tb)

    sys.excepthook = hook
    import atexit

    atexit.register(_at_exit)


def _at_exit() -> None:
    for t in list(_OPEN):
        try:
            t.finish() if t.at_exit == "complete" else t.finish(
                failed="the process ended before the training's end hook ran")
        except Exception:
            pass


def fail_open(reason: BaseException | str) -> None:
    for t in list(_OPEN):
        try:
            t.finish(failed=reason)
        except Exception:
            pass

"""The errors runwatch raises on purpose: one base class, and the ones every stage shares."""

from __future__ import annotations


class RunwatchError(Exception):
    """Base class of the errors runwatch raises on purpose."""


class StackNotRunning(RunwatchError):
    def __init__(self, where: str | None):
        where_text = f"no read API answers at {where}" if where else "no stack is recorded"
        super().__init__(f"runwatch: the stack is not running ({where_text}). Start it with `runwatch up`.")


class StackMismatch(RunwatchError):
    """The API or broker that answers is not the stack recorded under this RUNWATCH_HOME."""


class NotFound(RunwatchError, LookupError):
    pass


class ApiError(RunwatchError):
    pass


class FileError(RunwatchError, ValueError):
    """A name, size or checksum the store refuses; the message says which and why."""


class NotApplicable(RunwatchError, NotImplementedError):
    """An Azure ML call that has no meaning without Azure (docs/azureml.md says why, call by call)."""

    def __init__(self, call: str, why: str):
        super().__init__(f"{call} is not available in runwatch: {why} (docs/azureml.md)")


class MissingExtra(RunwatchError, ImportError):
    """A feature that needs an optional part of runwatch that is not installed."""

    def __init__(self, feature: str, extra: str = "stack", module: str | None = None):
        self.extra = extra
        super().__init__(f"runwatch: {feature} needs the {extra!r} extra"
                         + (f" (module {module!r} is not installed)" if module else "")
                         + f": pip install 'runwatch[{extra}]'")


def require(module: str, feature: str, extra: str = "stack"):
    """Import `module`, or raise MissingExtra naming the extra that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name and not module.startswith(exc.name) and not exc.name.startswith(module.split(".")[0]):
            raise  # the module is there but something it imports is broken: say that, not "install it"
        raise MissingExtra(feature, extra, module) from None

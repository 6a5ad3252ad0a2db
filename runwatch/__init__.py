"""runwatch: self-hosted run monitoring for machine-learning training (Azure ML v1's names)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Workspace", "Experiment", "Run", "ScriptRunConfig", "RunDetails", "MetricError", "MetricTypeError", "RunwatchError",
           "RunFailedError", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import runwatch` costs nothing until a name is used, and never imports the worker's parts.
    if name in ("Workspace", "Experiment", "Run", "MetricError", "MetricTypeError"):
        from runwatch.producers import run as _run

        return getattr(_run, name)
    if name == "ScriptRunConfig":
        from runwatch.producers.config import ScriptRunConfig

        return ScriptRunConfig
    if name == "RunDetails":
        from .widget import RunDetails

        return RunDetails
    if name == "RunFailedError":
        from runwatch.producers.watch import RunFailedError

        return RunFailedError
    if name == "RunwatchError":
        from .core.errors import RunwatchError

        return RunwatchError
    raise AttributeError(f"module 'runwatch' has no attribute {name!r}")

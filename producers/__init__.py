"""What runs inside training: the Run API and the background batching producer."""

from .run import Experiment, MetricError, MetricTypeError, Run, Workspace


def __getattr__(name: str):
    if name == "ScriptRunConfig":  # lazily: submitting imports what only submitted runs need
        from .config import ScriptRunConfig

        return ScriptRunConfig
    raise AttributeError(f"module 'runwatch.producers' has no attribute {name!r}")


__all__ = ["Workspace", "Experiment", "Run", "MetricError", "MetricTypeError", "ScriptRunConfig"]

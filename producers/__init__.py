"""What runs inside training: the Run API and the background batching producer."""

from .run import Experiment, MetricError, MetricTypeError, Run, Workspace


def __getattr__(name: str):
    if name == "ScriptRunConfig":  # lazily: `python -m runwatch.producers.launcher` must not import itself first
        from .launcher import ScriptRunConfig

        return ScriptRunConfig
    raise AttributeError(f"module 'runwatch.producers' has no attribute {name!r}")


__all__ = ["Workspace", "Experiment", "Run", "MetricError", "MetricTypeError", "ScriptRunConfig"]

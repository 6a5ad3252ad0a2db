"""What runs inside training: the Run API and the background batching producer."""

from .run import Experiment, MetricError, MetricTypeError, Run, Workspace

__all__ = ["Workspace", "Experiment", "Run", "MetricError", "MetricTypeError"]

"""`from azureml.core.workspace import Workspace`: runwatch's Workspace."""

from runwatch.producers.run import Workspace

__all__ = ["Workspace"]

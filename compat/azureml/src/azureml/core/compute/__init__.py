"""`from azureml.core.compute import ComputeTarget`."""

from ..compute_target import ComputeTarget

__all__ = ["ComputeTarget"]

"""`from azureml.core.run import Run` (transformers' AzureMLCallback, fastai's): runwatch's Run."""

from runwatch.producers.run import Run

__all__ = ["Run"]

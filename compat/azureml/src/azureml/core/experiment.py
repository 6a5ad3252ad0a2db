"""`from azureml.core.experiment import Experiment`: runwatch's Experiment."""

from runwatch.producers.run import Experiment

__all__ = ["Experiment"]

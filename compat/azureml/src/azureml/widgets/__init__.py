"""`from azureml.widgets import RunDetails`: runwatch's notebook widget."""

import azureml.core  # noqa: F401  (refuses to load next to Microsoft's azureml-core)
from runwatch.widget import RunDetails

__all__ = ["RunDetails"]

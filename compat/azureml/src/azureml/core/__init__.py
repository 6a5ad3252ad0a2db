"""`azureml.core` on runwatch: unchanged Azure ML v1 code logs to, reads from and submits to runwatch.

`from azureml.core import Workspace, Experiment, Run, ScriptRunConfig` gives runwatch's classes themselves; what
each call does here is in runwatch's docs/azureml.md.
"""

from __future__ import annotations

import importlib.metadata as _metadata


def _refuse_next_to_azureml_core() -> None:
    try:
        dist = _metadata.distribution("azureml-core")
    except _metadata.PackageNotFoundError:
        return
    raise ImportError(
        f"azureml.core here is runwatch-azureml's, and Microsoft's azureml-core {dist.version} is installed in the "
        "same environment: they overwrite each other's files. Use a separate virtual environment for "
        "runwatch-azureml, or `pip uninstall azureml-core runwatch-azureml` and reinstall the one you want.")


_refuse_next_to_azureml_core()

from runwatch.producers.config import ScriptRunConfig  # noqa: E402
from runwatch.producers.run import Experiment, Run, Workspace  # noqa: E402

from .compute_target import ComputeTarget  # noqa: E402
from .environment import Environment  # noqa: E402
from .runconfig import RunConfiguration  # noqa: E402

__all__ = ["ComputeTarget", "Environment", "Experiment", "Run", "RunConfiguration", "ScriptRunConfig", "Workspace"]

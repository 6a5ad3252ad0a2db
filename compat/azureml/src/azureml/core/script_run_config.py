"""`from azureml.core.script_run_config import ScriptRunConfig`: runwatch's ScriptRunConfig."""

from runwatch.producers.config import ScriptRunConfig

__all__ = ["ScriptRunConfig"]

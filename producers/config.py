"""ScriptRunConfig: what a submitted run runs, and where (Azure ML v1's names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runwatch.core.errors import RunwatchError
from runwatch.core.settings import Settings


class ConfigError(RunwatchError, ValueError):
    """A ScriptRunConfig that cannot run; the message names the field."""


@dataclass
class ScriptRunConfig:
    """What to run and where (Azure ML v1's names). `arguments` are passed to the script as strings."""

    source_directory: str = "."
    script: str | None = None
    arguments: list[Any] = field(default_factory=list)
    compute_target: str = "local"
    node_count: int = 1
    process_count_per_node: int = 1
    environment_variables: dict[str, str] = field(default_factory=dict)
    #: Stop the run (Failed) when it runs longer than this; None: no limit.
    max_run_duration_seconds: float | None = None

    def check(self, settings: Settings) -> None:
        """Raise ConfigError naming the first field that cannot run."""
        src = Path(self.source_directory).expanduser()
        if not src.is_dir():
            raise ConfigError(f"ScriptRunConfig: source_directory {str(src)!r} is not a directory")
        if not self.script or not isinstance(self.script, str):
            raise ConfigError("ScriptRunConfig: script is required, e.g. script='train.py'")
        script = src / self.script
        if not script.is_file():
            raise ConfigError(f"ScriptRunConfig: script {self.script!r} is not a file in {str(src.resolve())!r}")
        if not isinstance(self.arguments, (list, tuple)):
            raise ConfigError(f"ScriptRunConfig: arguments must be a list, not {type(self.arguments).__name__}")
        for name in ("node_count", "process_count_per_node"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"ScriptRunConfig: {name} must be an integer >= 1, not {v!r}")
        if not isinstance(self.environment_variables, dict) or not all(
                isinstance(k, str) and k and "=" not in k and isinstance(v, str)
                for k, v in self.environment_variables.items()):
            raise ConfigError("ScriptRunConfig: environment_variables must map names to string values")
        try:
            targets = settings.compute()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.compute_target not in targets:
            raise ConfigError(f"ScriptRunConfig: compute_target {self.compute_target!r} is not configured; "
                              f"known: {', '.join(f'{k} ({v} slots)' for k, v in targets.items())} "
                              "(setting compute_targets)")
        need = self.node_count * self.process_count_per_node
        if need > targets[self.compute_target]:
            raise ConfigError(f"ScriptRunConfig: the run needs {need} process slots "
                              f"({self.node_count} node(s) x {self.process_count_per_node} process(es)); compute "
                              f"{self.compute_target!r} has {targets[self.compute_target]}")
        if self.max_run_duration_seconds is not None and not self.max_run_duration_seconds > 0:
            raise ConfigError("ScriptRunConfig: max_run_duration_seconds must be > 0 or None")

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
    #: Azure's: `python <script> [arguments]` as a list or a string, in place of script and arguments.
    command: Any = None
    #: Azure's environment: the run uses the interpreter that submits it; its `environment_variables` apply.
    environment: Any = None
    #: Azure's PyTorchConfiguration / MpiConfiguration: its node_count and process count set the layout.
    distributed_job_config: Any = None
    #: Azure's RunConfiguration: its `target` and `node_count`, when set, apply; the rest has no meaning here.
    run_config: Any = None
    #: Azure's; no containers run here: accepted and unused (docs/azureml.md).
    docker_runtime_config: Any = None
    resume_from: Any = None

    def __post_init__(self) -> None:
        """Azure's other ways of saying the same things, folded into runwatch's fields."""
        if self.command is not None:
            self.script, self.arguments = _from_command(self.command, self.script, self.arguments)
            self.command = None
        rc = self.run_config
        if rc is not None:
            target = getattr(rc, "target", None)
            if isinstance(target, str) and target and self.compute_target == "local":
                self.compute_target = target
            nodes = getattr(rc, "node_count", None)
            if isinstance(nodes, int) and nodes > 1 and self.node_count == 1:
                self.node_count = nodes
            if self.environment is None:
                self.environment = getattr(rc, "environment", None)
        if self.compute_target is not None and not isinstance(self.compute_target, str):
            self.compute_target = getattr(self.compute_target, "name", self.compute_target)  # a ComputeTarget
        env_vars = getattr(self.environment, "environment_variables", None)
        if isinstance(env_vars, dict):
            self.environment_variables = {**{str(k): str(v) for k, v in env_vars.items()},
                                          **self.environment_variables}
        dj = self.distributed_job_config
        if dj is not None:
            nodes = getattr(dj, "node_count", 1) or 1
            per_node = getattr(dj, "process_count_per_node", None)
            total = getattr(dj, "process_count", None)
            if per_node is None and total is not None:
                if not isinstance(total, int) or not isinstance(nodes, int) or total % nodes:
                    raise ConfigError(f"ScriptRunConfig: distributed_job_config's process_count {total!r} is not "
                                      f"a multiple of its node_count {nodes!r}")
                per_node = total // nodes
            self.node_count, self.process_count_per_node = nodes, per_node if per_node is not None else 1

    def to_spec(self) -> dict[str, Any]:
        """What the launcher needs (JSON): runwatch's own fields, Azure's others already folded in."""
        return {k: getattr(self, k) for k in SPEC_FIELDS}

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


SPEC_FIELDS = ("source_directory", "script", "arguments", "compute_target", "node_count", "process_count_per_node",
               "environment_variables", "max_run_duration_seconds")


def _from_command(command: Any, script: str | None, arguments: list[Any]) -> tuple[str, list[Any]]:
    """`python train.py --lr 0.1` (a list or a string) as (script, arguments)."""
    import shlex

    parts = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
    if parts and Path(parts[0]).name.startswith("python"):
        parts = parts[1:]
    if script is not None or arguments:
        raise ConfigError("ScriptRunConfig: give either command or script and arguments, not both")
    if not parts or not parts[0].endswith(".py"):
        raise ConfigError(f"ScriptRunConfig: command {command!r} must run a Python script: python <script.py> "
                          "[arguments] (a submitted run's processes are Python, docs/submitting.md)")
    return parts[0], parts[1:]

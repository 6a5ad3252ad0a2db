"""Azure's ComputeTarget: here, one of runwatch's configured compute targets (setting compute_targets)."""

from __future__ import annotations

from typing import Any


class ComputeTarget:
    def __init__(self, workspace: Any = None, name: str = "local") -> None:
        from runwatch.core.settings import Settings

        targets = Settings().compute()
        if name not in targets:
            from runwatch.core.errors import NotFound

            raise NotFound(f"compute target {name!r} is not configured; known: {', '.join(sorted(targets))} "
                           "(setting compute_targets)")
        self.workspace, self.name, self.slots = workspace, name, targets[name]

    @staticmethod
    def list(workspace: Any = None) -> list["ComputeTarget"]:
        from runwatch.core.settings import Settings

        return [ComputeTarget(workspace, name) for name in Settings().compute()]

    def wait_for_completion(self, show_output: bool = False, **_: Any) -> None:
        """A configured target is always ready."""

    def __repr__(self) -> str:
        return f"ComputeTarget(name={self.name!r}, slots={self.slots})"

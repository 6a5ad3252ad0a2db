"""Azure's Environment, as far as it means something here.

A submitted run uses the interpreter that submits it: no image is built and no packages are installed. What does
apply is `environment_variables`; the rest is kept so that code which sets it still runs.
"""

from __future__ import annotations

from typing import Any


class _Section:
    """A settable bag for Azure's nested settings (`env.python.user_managed_dependencies = True`)."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


class Environment:
    def __init__(self, name: str = "runwatch-local") -> None:
        self.name = name
        self.version: str | None = None
        self.environment_variables: dict[str, str] = {}
        self.python = _Section(user_managed_dependencies=True, conda_dependencies=None, interpreter_path=None)
        self.docker = _Section(enabled=False, base_image=None)

    @classmethod
    def get(cls, workspace: Any, name: str, version: str | None = None) -> "Environment":
        """Azure's curated and registered environments: here, a named environment that runs locally."""
        env = cls(name)
        env.version = version
        return env

    @classmethod
    def from_conda_specification(cls, name: str, file_path: str) -> "Environment":
        return cls(name)

    @classmethod
    def from_pip_requirements(cls, name: str, file_path: str, pip_version: str | None = None) -> "Environment":
        return cls(name)

    @classmethod
    def from_existing_conda_environment(cls, name: str, conda_environment_name: str) -> "Environment":
        return cls(name)

    def register(self, workspace: Any) -> "Environment":
        return self

    def __repr__(self) -> str:
        return f"Environment(name={self.name!r})"

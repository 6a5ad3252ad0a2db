"""Azure's RunConfiguration and distributed job configurations: their layout fields set the submitted run's."""

from __future__ import annotations

from typing import Any


class RunConfiguration:
    """`target` and `node_count` apply to the run it configures; `environment`'s variables too."""

    def __init__(self, script: str | None = None, arguments: list[Any] | None = None, framework: str = "Python",
                 communicator: str = "None", **_: Any) -> None:
        from .environment import Environment

        self.script, self.arguments = script, list(arguments or [])
        self.framework, self.communicator = framework, communicator
        self.target = "local"
        self.node_count = 1
        self.environment = Environment()
        self.environment_variables: dict[str, str] = {}


class PyTorchConfiguration:
    """`process_count` over `node_count` nodes (torch.distributed: RANK, WORLD_SIZE, MASTER_ADDR, ...)."""

    def __init__(self, communication_backend: str = "Nccl", process_count: int | None = None,
                 node_count: int = 1) -> None:
        self.communication_backend = communication_backend
        self.process_count = process_count if process_count is not None else node_count
        self.node_count = node_count


class MpiConfiguration:
    """`process_count_per_node` on each of `node_count` nodes."""

    def __init__(self, process_count_per_node: int = 1, node_count: int = 1) -> None:
        self.process_count_per_node = process_count_per_node
        self.node_count = node_count


class TensorflowConfiguration:
    """`worker_count` processes (parameter servers have no meaning here)."""

    def __init__(self, worker_count: int = 1, parameter_server_count: int = 0) -> None:
        self.process_count = worker_count
        self.node_count = 1
        self.parameter_server_count = parameter_server_count


__all__ = ["MpiConfiguration", "PyTorchConfiguration", "RunConfiguration", "TensorflowConfiguration"]

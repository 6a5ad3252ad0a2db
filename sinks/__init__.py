"""ClickHouse: the schema and its migrations, the batching writer, the read queries."""

from .schema import LATEST, migrate

__all__ = ["LATEST", "migrate"]

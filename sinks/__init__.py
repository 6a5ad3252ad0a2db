"""ClickHouse: the schema and its migrations, the sink (consume, write, commit), the store writer, the
aggregates' repair."""

from .schema import LATEST, migrate

__all__ = ["LATEST", "migrate"]

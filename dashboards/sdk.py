"""What grafana-foundation-sdk lacks for us: a ClickHouse query (raw SQL), and small panel helpers.

The SDK has no ClickHouse query builder, so `ClickHouseQuery` is a Dataquery variant that
writes the `grafana-clickhouse-datasource` plugin's query model (SQL editor).
"""

from __future__ import annotations

import typing

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import dashboard as dm

PLUGIN = "grafana-clickhouse-datasource"
PLUGIN_VERSION = "4.15.0"
#: The provisioned datasource's fixed uid: every panel and alert rule refers to it.
DATASOURCE_UID = "runwatch-clickhouse"
DATASOURCE = dm.DataSourceRef(type_val=PLUGIN, uid=DATASOURCE_UID)

#: The plugin's result formats (its `format` field) and query types.
FORMATS = {"timeseries": 0, "table": 1, "logs": 2}


class ClickHouseQueryModel(cogvariants.Dataquery):
    def __init__(self, ref_id: str = "A", raw_sql: str = "", query_type: str = "table") -> None:
        self.ref_id = ref_id
        self.raw_sql = raw_sql
        self.query_type = query_type

    def to_json(self) -> dict[str, object]:
        return {
            "refId": self.ref_id, "datasource": DATASOURCE.to_json(), "editorType": "sql",
            "rawSql": self.raw_sql, "queryType": self.query_type, "format": FORMATS[self.query_type],
            "pluginVersion": PLUGIN_VERSION,
        }


class ClickHouseQuery(cogbuilder.Builder[ClickHouseQueryModel]):
    def __init__(self, raw_sql: str, query_type: str = "table", ref_id: str = "A") -> None:
        if query_type not in FORMATS:
            raise ValueError(f"query_type must be one of {sorted(FORMATS)}, not {query_type!r}")
        self._internal = ClickHouseQueryModel(ref_id, raw_sql, query_type)

    def build(self) -> ClickHouseQueryModel:
        return self._internal


def grid(x: int, y: int, w: int, h: int) -> dm.GridPos:
    return dm.GridPos(x=x, y=y, w=w, h=h)


def transformation(id_val: str, options: dict[str, typing.Any]) -> dm.DataTransformerConfig:
    return dm.DataTransformerConfig(id_val=id_val, options=options)

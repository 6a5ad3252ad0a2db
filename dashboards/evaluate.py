"""Run a dashboard's queries outside Grafana: resolve its variables by their own queries, expand every
panel's SQL as Grafana and the plugin would. Used by the tests and the dashboard benchmark."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable

from .macros import ALL, Variable, expand, template

Query = Callable[[str], Any]  # runs SQL, returns a clickhouse-connect result


def resolve(run: Query, model: dict, choices: dict[str, Any], time_range: tuple[datetime, datetime]
            ) -> dict[str, Variable]:
    """Each variable as Grafana resolves it, in order: query variables run their SQL; `choices` pick values."""
    out: dict[str, Variable] = {}
    for v in model.get("templating", {}).get("list", []):
        name, kind = v["name"], v["type"]
        if kind == "query":
            options = [str(r[0]) for r in run(expand(v["query"], out, *time_range)).result_rows]
        elif kind == "custom":
            options = v["query"].split(",")
        elif kind == "constant":
            options = [v["query"]]
        else:
            options = []
        if name in choices:
            current = choices[name]
        elif kind == "constant":
            current = v["query"]
        elif v.get("includeAll"):
            current = ALL
        else:
            current = options[0] if options else ""
        out[name] = Variable(current, options)
    return out


def panel_queries(model: dict, variables: dict[str, Variable], time_range: tuple[datetime, datetime]
                  ) -> list[tuple[str, str, str, int]]:
    """(title as shown, expanded SQL, panel type, plugin format) of every panel; repeated panels once per value."""
    out = []
    for panel in model["panels"]:
        repeat = panel.get("repeat")
        values: list[Any] = [None]
        if repeat:
            var = variables[repeat]
            values = var.options if var.current == ALL else (
                var.current if isinstance(var.current, list) else [var.current])
        for value in values:
            vs = dict(variables)
            if repeat:
                vs[repeat] = Variable(value, variables[repeat].options)
            points = panel.get("maxDataPoints", 1000)
            interval = max(1.0, (time_range[1] - time_range[0]).total_seconds() / points)
            for target in panel["targets"]:
                out.append((template(panel["title"], vs), expand(target["rawSql"], vs, *time_range, interval),
                            panel["type"], target["format"]))
    return out

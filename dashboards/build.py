"""The studio's dashboards, as code: `build_all()` returns every dashboard's JSON model.

Every panel's SQL is written for the grafana-clickhouse-datasource plugin (its macros,
Grafana's template variables) and is executed by the tests against chDB filled by the real
pipeline (tests/test_dashboards.py). Long series are never returned whole: charts ask for
min and max per bucket, at most `max_points` buckets per series.
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import (
    barchart,
    logs,
    stat,
    table,
    timeseries,
    trend,
    xychart,
)
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm

from runwatch.core import states
from runwatch.core.names import PROCESSES_PROPERTY, SCRIPT_RUN, SYSTEM_PREFIX as SYSTEM

from .sdk import DATASOURCE, ClickHouseQuery, grid, transformation

DB = "runwatch"
#: The non-terminal states as the inside of a SQL list: `status IN ({ACTIVE})`.
ACTIVE = states.sql_list(states.ACTIVE)[1:-1]
STATES = list(states.ALL)
MAX_POINTS = 1000
TAGS = ["runwatch"]

#: uid -> path of each dashboard (Grafana's /d/<uid>/<slug>).
UIDS = {"experiments": "runwatch-experiments", "runs": "runwatch-runs", "run": "runwatch-run",
        "compare": "runwatch-compare", "compute": "runwatch-compute", "parent": "runwatch-parent"}


def url(name: str) -> str:
    return f"/d/{UIDS[name]}/{UIDS[name]}"


RUN_LINK = url("run") + "?var-run_id=${__value.raw}&${__url_time_range}"
DURATION = ("if(isNull(r.end_time) OR isNull(r.start_time), NULL, "
            "dateDiff('millisecond', r.start_time, r.end_time) / 1000)")


def q(sql: str, kind: str = "table", ref: str = "A") -> ClickHouseQuery:
    return ClickHouseQuery(" ".join(sql.split()), kind, ref)


def link(title: str, target: str) -> db.DashboardLink:
    return db.DashboardLink(title).type(dm.DashboardLinkType.LINK).url(target)


def query_var(name: str, sql: str, *, multi: bool = False, all_: bool = False, label: str | None = None):
    v = (db.QueryVariable(name).label(label or name).datasource(DATASOURCE).query(" ".join(sql.split()))
         .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC))
    if multi:
        v = v.multi(True)
    if all_:
        v = v.include_all(True)
    return v


def text_var(name: str, label: str, default: str = ""):
    return db.TextBoxVariable(name).label(label).default_value(default)


def const_var(name: str, value: str):
    return db.ConstantVariable(name).value(value)


def base(key: str, title: str, time_from: str = "now-7d") -> db.Dashboard:
    return (db.Dashboard(title).uid(UIDS[key]).tags(TAGS).editable().time(time_from, "now").refresh("10s")
            .timezone(common.TimeZoneUtc)
            .link(db.DashboardLink("runwatch").type(dm.DashboardLinkType.DASHBOARDS).tags(TAGS).as_dropdown(True)))


def cond(column: str, var: str) -> str:
    """The plugin's $__conditionalAll: the filter when some values are chosen, 1=1 for All."""
    return f"$__conditionalAll({column} IN (${{{var}}}), ${var})"


# ------------------------------------------------------------------------------------ Experiments
def experiments() -> db.Dashboard:
    where = f"parent_run_id IS NULL AND {cond('experiment', 'experiment')}"
    return (base("experiments", "runwatch / Experiments", "now-30d")
            .with_variable(query_var("experiment", f"SELECT DISTINCT experiment FROM {DB}.runs FINAL",
                                     multi=True, all_=True))
            .with_panel(table.Panel().title("Experiments").grid_pos(grid(0, 0, 24, 9)).with_target(q(f"""
                SELECT experiment, count() AS runs, countIf(status IN ({ACTIVE})) AS active,
                       countIf(status = 'Completed') AS completed, countIf(status = 'Failed') AS failed,
                       countIf(status = 'Canceled') AS canceled,
                       max(greatest(ifNull(end_time, toDateTime64(0, 6, 'UTC')),
                                    ifNull(start_time, toDateTime64(0, 6, 'UTC')),
                                    ifNull(created_time, toDateTime64(0, 6, 'UTC')))) AS latest_activity
                FROM {DB}.runs FINAL WHERE {where}
                GROUP BY experiment ORDER BY latest_activity DESC"""))
                .override_by_name("experiment", [dm.DynamicConfigValue(id_val="links", value=[{
                    "title": "Runs of ${__value.raw}", "url": url("runs") + "?var-experiment=${__value.raw}"}])]))
            .with_panel(barchart.Panel().title("Runs by status").grid_pos(grid(0, 9, 12, 9)).with_target(q(f"""
                SELECT experiment, countIf(status = 'Completed') AS Completed, countIf(status = 'Failed') AS Failed,
                       countIf(status = 'Canceled') AS Canceled, countIf(status IN ({ACTIVE})) AS Active
                FROM {DB}.runs FINAL WHERE {where} GROUP BY experiment ORDER BY experiment"""))
                .x_field("experiment").stacking(common.StackingMode.NORMAL))
            .with_panel(timeseries.Panel().title("Runs started").grid_pos(grid(12, 9, 12, 9)).with_target(q(f"""
                SELECT $__timeInterval(created_time) AS time, experiment, count() AS runs
                FROM {DB}.runs FINAL WHERE $__timeFilter(created_time) AND {where}
                GROUP BY time, experiment ORDER BY time""", "timeseries"))))


# ------------------------------------------------------------------------------------ All runs
TAG_FILTER = ("('${tag}' = '' OR (mapContains(r.tags, splitByChar('=', '${tag}')[1]) AND "
              "(position('${tag}', '=') = 0 OR r.tags[splitByChar('=', '${tag}')[1]] = "
              "substring('${tag}', position('${tag}', '=') + 1))))")
RUN_FILTERS = (f"r.parent_run_id IS NULL AND {cond('r.experiment', 'experiment')} AND {cond('r.status', 'status')} "
               f"AND {cond('r.compute_target', 'compute_target')} AND {TAG_FILTER}")


def all_runs() -> db.Dashboard:
    metrics_sql = f"SELECT DISTINCT name FROM {DB}.metric_aggregates FINAL WHERE column = ''"
    agg = ", ".join(f"{fn}IfOrNull({col}, name = '${{{var}}}') AS {var[-1]}_{col}"
                    for var in ("metric_a", "metric_b") for fn, col in (("min", "min"), ("max", "max"),
                                                                         ("any", "last")))
    cols = ", ".join(f'a.{var[-1]}_{col} AS "${{{var}}} {col}"' for var in ("metric_a", "metric_b")
                     for col in ("min", "max", "last"))
    return (base("runs", "runwatch / All runs", "now-30d")
            .with_variable(query_var("experiment", f"SELECT DISTINCT experiment FROM {DB}.runs FINAL",
                                     multi=True, all_=True))
            .with_variable(db.CustomVariable("status").label("status").values(",".join(STATES)).multi(True)
                           .include_all(True))
            .with_variable(query_var("compute_target", f"SELECT DISTINCT compute_target FROM {DB}.runs FINAL",
                                     multi=True, all_=True, label="compute target"))
            .with_variable(text_var("tag", "tag (NAME or NAME=VALUE)"))
            .with_variable(query_var("metric_a", metrics_sql, label="metric"))
            .with_variable(query_var("metric_b", metrics_sql, label="second metric"))
            .with_variable(query_var("runs", f"""SELECT r.run_id FROM {DB}.runs AS r FINAL WHERE {RUN_FILTERS}
                                                 ORDER BY r.created_time DESC LIMIT 500""", multi=True,
                                     label="runs to compare"))
            .link(link("Compare the chosen runs", url("compare") + "?${runs:queryparam}&var-metric=${metric_a}"))
            .with_panel(table.Panel().title("Runs").grid_pos(grid(0, 0, 24, 16)).with_target(q(f"""
                SELECT r.run_id AS run_id, r.display_name AS name, r.experiment AS experiment, r.status AS status,
                       r.compute_target AS compute_target, r.start_time AS started, {DURATION} AS duration_s,
                       r.tags_json AS tags, {cols}
                FROM {DB}.runs AS r FINAL
                LEFT JOIN (SELECT run_id, {agg} FROM {DB}.metric_aggregates FINAL
                           WHERE column = '' AND name IN ('${{metric_a}}', '${{metric_b}}') GROUP BY run_id) AS a
                       ON a.run_id = r.run_id
                WHERE {RUN_FILTERS}
                ORDER BY r.created_time DESC LIMIT 1000"""))
                .filterable(True)
                .override_by_name("run_id", [dm.DynamicConfigValue(id_val="links", value=[
                    {"title": "Open run ${__value.raw}", "url": RUN_LINK}])])))


# ------------------------------------------------------------------------------------ Run
def _bucketed(where: str, by_run: bool = False) -> str:
    """Min and max per bucket of steps: at most $max_points buckets per series, spikes kept."""
    return f"""
        WITH (SELECT greatest(1, intDiv(max(step) - min(step) + 1, ${{max_points}}))
              FROM {DB}.metric_points WHERE {where}) AS width
        SELECT intDiv(step, width) * width AS step_start, {'run_id, ' if by_run else ''}
               min(value) AS min, max(value) AS max
        FROM {DB}.metric_points WHERE {where}
        GROUP BY {'run_id, ' if by_run else ''}step_start ORDER BY {'run_id, ' if by_run else ''}step_start"""


SERIES = "kind IN ('scalar', 'list') AND dtype != 'str'"


def run() -> db.Dashboard:
    rid = "run_id = '${run_id}'"
    return (base("run", "runwatch / Run", "now-30d")
            .with_variable(text_var("run_id", "run id"))
            .with_variable(query_var("metric", f"""SELECT DISTINCT name FROM {DB}.metric_points
                                                   WHERE {rid} AND {SERIES} AND NOT startsWith(name, '{SYSTEM}')""",
                                     multi=True, all_=True))
            .with_variable(query_var("system_metric", f"""SELECT DISTINCT name FROM {DB}.metric_points
                                                          WHERE {rid} AND startsWith(name, '{SYSTEM}')""",
                                     multi=True, all_=True, label="system metric"))
            .with_variable(query_var("table_metric", f"""SELECT DISTINCT name FROM {DB}.metric_points
                                                         WHERE {rid} AND kind IN ('row', 'table')""",
                                     multi=True, all_=True, label="table"))
            .with_variable(query_var("log_file", f"SELECT DISTINCT file FROM {DB}.log_lines WHERE {rid}",
                                     label="log file"))
            .with_variable(const_var("max_points", str(MAX_POINTS)))
            .with_variable(const_var("api_url", "http://127.0.0.1:8765"))
            .with_panel(table.Panel().title("Run").grid_pos(grid(0, 0, 24, 5)).with_target(q(f"""
                SELECT r.run_id AS run_id, r.display_name AS name, r.experiment AS experiment, r.status AS status,
                       r.run_type AS run_type, r.compute_target AS compute_target, r.created_time AS created,
                       r.start_time AS started, r.end_time AS ended, {DURATION} AS duration_s,
                       r.tags_json AS tags, toJSONString(r.properties) AS properties, r.error AS error,
                       r.dropped_points AS dropped_points, r.parent_run_id AS parent_run_id
                FROM {DB}.runs AS r FINAL WHERE r.{rid}"""))
                .override_by_name("parent_run_id", [dm.DynamicConfigValue(id_val="links", value=[
                    {"title": "Open the parent run", "url": RUN_LINK}])]))
            .with_panel(table.Panel().title("Status history").grid_pos(grid(0, 5, 12, 6)).with_target(q(f"""
                SELECT ts, from_status, to_status, applied, reason FROM {DB}.status_history FINAL
                WHERE {rid} ORDER BY ts""")))
            .with_panel(table.Panel().title("Child runs").grid_pos(grid(12, 5, 12, 6)).with_target(q(f"""
                SELECT r.run_id AS run_id, r.display_name AS name, r.status AS status, r.start_time AS started,
                       {DURATION} AS duration_s
                FROM {DB}.runs AS r FINAL WHERE r.parent_run_id = '${{run_id}}' ORDER BY r.created_time"""))
                .override_by_name("run_id", [dm.DynamicConfigValue(id_val="links", value=[
                    {"title": "Open child run ${__value.raw}", "url": RUN_LINK}])]))
            .with_panel(trend.Panel().title("${metric}").repeat("metric").repeat_direction("h").max_per_row(3)
                        .grid_pos(grid(0, 11, 8, 8)).x_field("step_start").with_target(q(_bucketed(
                            f"{rid} AND name = '${{metric}}' AND {SERIES} AND $__timeFilter(ts)")))
                        .description("One variable: min and max per bucket of steps (spikes survive)."))
            .with_panel(xychart.Panel().title("${table_metric}").repeat("table_metric").repeat_direction("h")
                        .max_per_row(3).grid_pos(grid(0, 19, 8, 8)).with_target(q(f"""
                WITH (SELECT arraySort(groupUniqArray(column)) FROM {DB}.metric_points
                      WHERE {rid} AND name = '${{table_metric}}' AND kind IN ('row', 'table')) AS cols
                SELECT step, maxIf(value, column = cols[1]) AS x, maxIf(value, column = cols[2]) AS y,
                       cols[1] AS x_column, cols[2] AS y_column
                FROM {DB}.metric_points WHERE {rid} AND name = '${{table_metric}}' AND kind IN ('row', 'table')
                GROUP BY step ORDER BY step LIMIT 10000"""))
                        .description("Two variables: the table's first column (by name) against its second."))
            .with_panel(table.Panel().title("Images").grid_pos(grid(0, 27, 24, 8)).with_target(q(f"""
                SELECT name, step, text AS file,
                       concat('${{api_url}}/api/runs/', encodeURLComponent(run_id), '/files/',
                              replaceAll(encodeURLComponent(text), '%2F', '/')) AS image
                FROM {DB}.metric_points WHERE {rid} AND kind = 'image' ORDER BY name, step"""))
                .cell_height(common.TableCellHeight.LG)
                .override_by_name("image", [dm.DynamicConfigValue(id_val="custom.cellOptions",
                                                                  value={"type": "image"})]))
            .with_panel(table.Panel().title("Files").grid_pos(grid(0, 35, 8, 10)).with_target(q(f"""
                SELECT file, min(node) AS node, min(rank) AS rank, count() AS lines, max(ts) AS last_written
                FROM {DB}.log_lines WHERE {rid} GROUP BY file
                UNION ALL
                SELECT name AS file, 0 AS node, 0 AS rank, 0 AS lines, ts AS last_written
                FROM {DB}.run_files FINAL WHERE {rid}
                ORDER BY file"""))
                .override_by_name("file", [dm.DynamicConfigValue(id_val="links", value=[
                    {"title": "Show ${__value.raw}",
                     "url": url("run") + "?var-run_id=${run_id}&var-log_file=${__value.raw}&${__url_time_range}"}])]))
            .with_panel(logs.Panel().title("${log_file}").grid_pos(grid(8, 35, 16, 10)).with_target(q(f"""
                SELECT ts AS timestamp, line AS body, if(stream = 'stderr', 'error', 'info') AS level,
                       rank, stream, seq
                FROM {DB}.log_lines WHERE {rid} AND file = '${{log_file}}'
                ORDER BY seq DESC LIMIT 1 BY seq LIMIT 5000""", "logs"))
                .show_time(True).wrap_log_message(True).sort_order(common.LogsSortOrder.ASCENDING))
            .with_panel(timeseries.Panel().title("${system_metric}").repeat("system_metric").repeat_direction("h")
                        .max_per_row(4).grid_pos(grid(0, 45, 6, 7)).with_target(q(f"""
                SELECT ts AS time, value AS "${{system_metric}}" FROM {DB}.metric_points
                WHERE {rid} AND name = '${{system_metric}}' AND $__timeFilter(ts) ORDER BY ts LIMIT 10000""",
                                                                                      "timeseries"))
                        .description("The run's system metrics over time (CPU, memory, disk, network, GPU; "
                                     "per rank and node on a run of several processes).")))


# ------------------------------------------------------------------------------------ Compare runs
def compare() -> db.Dashboard:
    runs = "run_id IN (${runs})"
    return (base("compare", "runwatch / Compare runs", "now-30d")
            .with_variable(query_var("runs", f"SELECT run_id FROM {DB}.runs FINAL ORDER BY created_time DESC "
                                             "LIMIT 500", multi=True))
            .with_variable(query_var("metric", f"""SELECT DISTINCT name FROM {DB}.metric_aggregates FINAL
                                                   WHERE {runs} AND column = ''"""))
            .with_variable(const_var("max_points", str(MAX_POINTS)))
            .with_panel(trend.Panel().title("${metric} by step").grid_pos(grid(0, 0, 24, 10)).x_field("step_start")
                        .with_target(q(_bucketed(f"{runs} AND name = '${{metric}}' AND {SERIES}", by_run=True)))
                        .with_transformation(transformation("partitionByValues", {"fields": ["run_id"]})))
            .with_panel(timeseries.Panel().title("${metric} over time").grid_pos(grid(0, 10, 24, 9))
                        .max_data_points(MAX_POINTS).with_target(q(f"""
                SELECT $__timeInterval(ts) AS time, run_id, min(value) AS min, max(value) AS max
                FROM {DB}.metric_points WHERE {runs} AND name = '${{metric}}' AND {SERIES} AND $__timeFilter(ts)
                GROUP BY time, run_id ORDER BY time""", "timeseries")))
            .with_panel(table.Panel().title("Aggregates of ${metric}").grid_pos(grid(0, 19, 24, 8)).with_target(q(f"""
                SELECT run_id, kind, count, min, max, first, last, last_step FROM {DB}.metric_aggregates FINAL
                WHERE {runs} AND name = '${{metric}}' AND column = '' ORDER BY min"""))
                .override_by_name("run_id", [dm.DynamicConfigValue(id_val="links", value=[
                    {"title": "Open run ${__value.raw}", "url": RUN_LINK}])])))


# ------------------------------------------------------------------------------------ Compute
def compute() -> db.Dashboard:
    where = (f"run_type = '{SCRIPT_RUN}' AND status IN ({ACTIVE}) AND "
             f"{cond('compute_target', 'compute_target')}")
    procs = f"toUInt32OrDefault(properties['{PROCESSES_PROPERTY}'], toUInt32(1))"
    return (base("compute", "runwatch / Compute", "now-7d")
            .with_variable(query_var("compute_target", f"""SELECT DISTINCT compute_target FROM {DB}.runs FINAL
                                                           WHERE run_type = '{SCRIPT_RUN}'""",
                                     multi=True, all_=True, label="compute target"))
            .with_panel(barchart.Panel().title("Queued and running per compute target").grid_pos(grid(0, 0, 12, 8))
                        .x_field("compute_target").with_target(q(f"""
                SELECT compute_target, countIf(status = 'Queued') AS queued, countIf(status != 'Queued') AS running,
                       sumIf({procs}, status != 'Queued') AS slots_in_use
                FROM {DB}.runs FINAL WHERE {where} GROUP BY compute_target ORDER BY compute_target""")))
            .with_panel(timeseries.Panel().title("Runs submitted").grid_pos(grid(12, 0, 12, 8)).with_target(q(f"""
                SELECT $__timeInterval(created_time) AS time, compute_target, count() AS runs
                FROM {DB}.runs FINAL WHERE run_type = '{SCRIPT_RUN}' AND $__timeFilter(created_time)
                      AND {cond('compute_target', 'compute_target')}
                GROUP BY time, compute_target ORDER BY time""", "timeseries")))
            .with_panel(table.Panel().title("Queue").grid_pos(grid(0, 8, 24, 12)).with_target(q(f"""
                SELECT compute_target, status, run_id, experiment, {procs} AS processes, created_time AS submitted,
                       start_time AS started
                FROM {DB}.runs FINAL WHERE {where}
                ORDER BY compute_target, status = 'Queued', created_time"""))
                .override_by_name("run_id", [dm.DynamicConfigValue(id_val="links", value=[
                    {"title": "Open run ${__value.raw}", "url": RUN_LINK}])])))


# ------------------------------------------------------------------------------------ AutoML parent
def parent() -> db.Dashboard:
    kids = f"SELECT run_id FROM {DB}.runs FINAL WHERE parent_run_id = '${{parent_run_id}}'"
    joined = f"""FROM {DB}.runs AS r FINAL
                 LEFT JOIN (SELECT run_id, toNullable(min) AS min, toNullable(max) AS max, toNullable(last) AS last,
                                   toNullable(count) AS count FROM {DB}.metric_aggregates FINAL
                            WHERE name = '${{metric}}' AND column = '' AND run_id IN ({kids})) AS a
                        ON a.run_id = r.run_id
                 WHERE r.parent_run_id = '${{parent_run_id}}'"""
    best = "if('${goal}' = 'max', -a.max, a.min)"
    return (base("parent", "runwatch / Parent run (AutoML-style)", "now-30d")
            .with_variable(text_var("parent_run_id", "parent run id"))
            .with_variable(query_var("metric", f"""SELECT DISTINCT name FROM {DB}.metric_aggregates FINAL
                                                   WHERE column = '' AND run_id IN ({kids})"""))
            .with_variable(db.CustomVariable("goal").label("best is the").values("min,max"))
            .with_variable(const_var("max_points", str(MAX_POINTS)))
            .with_panel(stat.Panel().title("Best child by ${metric} (${goal})").grid_pos(grid(0, 0, 8, 5))
                        .with_target(q(f"""
                SELECT r.run_id AS best_child, if('${{goal}}' = 'max', a.max, a.min) AS value {joined}
                       AND a.run_id != '' ORDER BY {best} ASC LIMIT 1"""))
                        .text_mode(common.BigValueTextMode.VALUE_AND_NAME))
            .with_panel(barchart.Panel().title("Children's last ${metric}").grid_pos(grid(8, 0, 16, 5))
                        .x_field("child").with_target(q(f"""
                SELECT coalesce(r.display_name, r.run_id) AS child, a.last AS last {joined}
                ORDER BY r.created_time""")))
            .with_panel(table.Panel().title("Children by ${metric}").grid_pos(grid(0, 5, 24, 9)).with_target(q(f"""
                SELECT r.run_id AS run_id, r.display_name AS name, r.status AS status, a.min AS min, a.max AS max,
                       a.last AS last, a.count AS points {joined}
                ORDER BY {best} ASC"""))
                .override_by_name("run_id", [dm.DynamicConfigValue(id_val="links", value=[
                    {"title": "Open run ${__value.raw}", "url": RUN_LINK}])]))
            .with_panel(trend.Panel().title("Children's ${metric} by step").grid_pos(grid(0, 14, 24, 10))
                        .x_field("step_start").with_target(q(_bucketed(
                            f"run_id IN ({kids}) AND name = '${{metric}}' AND {SERIES}", by_run=True)))
                        .with_transformation(transformation("partitionByValues", {"fields": ["run_id"]}))))


BUILDERS = {"experiments": experiments, "runs": all_runs, "run": run, "compare": compare, "compute": compute,
            "parent": parent}


def build_all(api_url: str | None = None) -> dict[str, dict[str, Any]]:
    """{file name: dashboard JSON model}. `api_url` sets where the Run dashboard loads images from."""
    out = {}
    encoder = JSONEncoder(sort_keys=True, indent=2)
    for key, fn in BUILDERS.items():
        model = json.loads(encoder.encode(fn().build()))
        if api_url:
            for v in model.get("templating", {}).get("list", []):
                if v.get("name") == "api_url":
                    v["query"] = api_url
                    v["current"] = {"text": api_url, "value": api_url}
        out[f"{UIDS[key]}.json"] = model
    return out

"""The read queries behind the read API. Every user value is a bound parameter, never pasted into SQL."""

from __future__ import annotations

import itertools
import json
import math
from datetime import datetime, timezone
from typing import Any

from runwatch.core import names
from runwatch.core.names import COLUMNS_PROPERTY_PREFIX, PROCESSES_PROPERTY, SCRIPT_RUN, SYSTEM_PREFIX
from runwatch.core.states import ACTIVE

DB = "runwatch"
ISO = "'%Y-%m-%dT%H:%i:%S.%f+00:00'"


def run_columns(t: str = "") -> str:
    """The columns `run_row` reads, from table alias `t` (e.g. "r."). ClickHouse writes the times as ISO 8601
    text and works out the duration: building datetime objects to format them cost a query over 1,000 runs
    more than half its time in Python (docs/performance.md). The properties come as JSON text too: decoding
    the Map column in Python cost more than parsing the text, which is mostly `{}`."""
    return ", ".join(_run_columns(t))


def _run_columns(t: str) -> list[str]:
    return [f"{t}run_id", f"{t}experiment", f"{t}display_name", f"{t}description", f"{t}parent_run_id", f"{t}run_type",
            f"{t}compute_target", f"{t}status", f"formatDateTime({t}created_time, {ISO})",
            f"formatDateTime({t}start_time, {ISO})", f"formatDateTime({t}end_time, {ISO})",
            f"dateDiff('microsecond', {t}start_time, {t}end_time) / 1e6", f"toJSONString({t}properties)",
            f"{t}tags_json", f"{t}error", f"{t}dropped_points", f"{t}illegal_transitions", f"{t}version",
            f"{t}seen"]


RUN_COLUMNS = run_columns()
_N_RUN_COLUMNS = len(_run_columns(""))


def agg_columns(t: str = "") -> str:
    """What `_aggregate` reads of a row of metric_aggregates, from table alias `t`."""
    return ", ".join(t + c for c in ("kind", "count", "min", "max", "first", "last", "last_text", "last_step"))


SORTS = {"min", "max", "last", "first", "count"}
TABLES = ("metric_points", "metric_aggregates", "runs", "status_history", "log_lines", "alerts", "dead_letters",
          "run_files")


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.isoformat()
    return str(value)


def _aggregate(kind: str, count: int, mn: float, mx: float, first: float, last: float, last_text: str,
               last_step: int) -> dict[str, Any]:
    # NaN and ±inf stay floats: the API writes them as JSON's NaN/Infinity tokens (docs/api.md)
    return {"kind": kind, "count": int(count), "min": mn, "max": mx, "first": first,
            "last": last_text if last_text and (last != last) else last, "last_step": int(last_step)}


def _json_object(text: str) -> dict[str, Any]:
    return {} if not text or text == "{}" else json.loads(text)


def run_row(r: tuple) -> dict[str, Any]:
    (run_id, experiment, display_name, description, parent, run_type, target, status, created, start, end,
     duration, props, tags_json, error, dropped, illegal, version, seen) = r
    return {
        "run_id": run_id, "experiment": experiment, "display_name": display_name, "description": description,
        "parent_run_id": parent,
        "run_type": run_type, "compute_target": target, "status": status, "created_time": created,
        "start_time": start, "end_time": end, "duration_s": duration,
        "properties": _json_object(props), "tags": _json_object(tags_json),
        "error": json.loads(error) if error else None, "dropped_points": int(dropped),
        "illegal_transitions": int(illegal), "version": int(version),
        # what of each source's events this record was built from: a writer tells whether it shows its writes
        "seen": _json_object(seen),
    }


class Queries:
    def __init__(self, client):
        self.client = client

    def _rows(self, sql: str, **params: Any) -> list[tuple]:
        return self.client.query(sql, parameters=params).result_rows

    # -- experiments and runs ----------------------------------------------------------------
    def experiments(self) -> list[dict[str, Any]]:
        rows = self._rows(f"""
            SELECT experiment, countIf(parent_run_id IS NULL) AS runs,
                   groupArrayIf(status, parent_run_id IS NULL) AS statuses,
                   max(greatest(created_time, ifNull(start_time, created_time), ifNull(end_time, created_time)))
                       AS latest
            FROM {DB}.runs FINAL GROUP BY experiment HAVING runs > 0 ORDER BY latest DESC""")
        out = []
        for name, n, statuses, latest in rows:
            by_status: dict[str, int] = {}
            for s in statuses:
                by_status[s] = by_status.get(s, 0) + 1
            out.append({"name": name, "runs": int(n), "by_status": by_status, "latest_activity": _iso(latest)})
        return out

    def runs(self, *, experiment: str | None = None, status: list[str] | None = None,
             compute_target: str | None = None, tags: list[str] | None = None, properties: list[str] | None = None,
             parent: str | None = None, include_children: bool = False, run_type: str | None = None,
             metrics: list[str] | None = None, sort_metric: str | None = None, sort: str = "max",
             order: str = "desc", limit: int = 1000, run_ids: list[str] | None = None) -> list[dict[str, Any]]:
        where, params = ["1"], {}
        if run_ids:
            where.append("r.run_id IN {run_ids:Array(String)}")
            params["run_ids"] = list(run_ids)
        if experiment is not None:
            where.append("r.experiment = {experiment:String}")
            params["experiment"] = experiment
        if status:
            where.append("r.status IN {status:Array(String)}")
            params["status"] = list(status)
        if compute_target is not None:
            where.append("r.compute_target = {target:String}")
            params["target"] = compute_target
        if run_type is not None:
            where.append("r.run_type = {run_type:String}")
            params["run_type"] = run_type
        if parent is not None:
            where.append("r.parent_run_id = {parent:String}")
            params["parent"] = parent
        elif not include_children:
            where.append("r.parent_run_id IS NULL")
        _map_filters(where, params, "r.tags", "t", tags)
        _map_filters(where, params, "r.properties", "p", properties)
        if sort not in SORTS:
            raise ValueError(f"sort must be one of {sorted(SORTS)}, not {sort!r}")
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be asc or desc, not {order!r}")
        params["limit"] = int(limit)
        wanted = list(dict.fromkeys((metrics or []) + ([sort_metric] if sort_metric else [])))
        joined: dict[str, dict[str, Any]] = {}
        if sort_metric:
            params["sort_metric"] = sort_metric
            # the aggregates of the runs' experiment only, when there is one: not every experiment's
            in_experiment = " AND experiment = {experiment:String}" if experiment is not None else ""
            # the sort metric's aggregate comes with its run: a second query for it cost the query over 1,000
            # runs a fifth of its time (docs/performance.md)
            sql = f"""
                SELECT {run_columns("r.")}, {agg_columns("a.")} FROM {DB}.runs AS r FINAL
                LEFT JOIN (SELECT run_id, {sort} AS sort_value, {agg_columns()}
                           FROM {DB}.metric_aggregates FINAL
                           WHERE name = {{sort_metric:String}} AND column = ''{in_experiment}) AS a
                          ON a.run_id = r.run_id
                WHERE {' AND '.join(where)}
                ORDER BY isNull(a.sort_value) OR isNaN(a.sort_value), a.sort_value {order.upper()}, r.created_time DESC
                LIMIT {{limit:UInt32}} SETTINGS join_use_nulls = 1"""
            runs = []
            for row in self._rows(sql, **params):
                run = run_row(row[:_N_RUN_COLUMNS])
                if row[_N_RUN_COLUMNS] is not None:  # the aggregate's kind: NULL when the run has no such scalar
                    joined[run["run_id"]] = {sort_metric: _aggregate(*row[_N_RUN_COLUMNS:])}
                runs.append(run)
        else:
            sql = f"""SELECT {RUN_COLUMNS} FROM {DB}.runs AS r FINAL WHERE {' AND '.join(where)}
                      ORDER BY r.created_time DESC LIMIT {{limit:UInt32}}"""
            runs = [run_row(r) for r in self._rows(sql, **params)]
        # a run with the sort metric as a scalar or a list has no table columns of that name (the SDK keeps a
        # name to one kind in a run), so when every run has it, it need not be read again
        if sort_metric and len(joined) == len(runs):
            wanted.remove(sort_metric)
        # within one experiment, select its aggregates by experiment: binding 1,000 run ids into the query cost
        # more than reading the few extra rows (8.7 vs 3.5 ms, docs/performance.md)
        aggs = self.aggregates([r["run_id"] for r in runs], wanted, experiment=experiment) if wanted and runs else {}
        if metrics or sort_metric:
            for r in runs:
                r["metrics"] = {**joined.get(r["run_id"], {}), **aggs.get(r["run_id"], {})}
        return runs

    def run(self, run_id: str) -> dict[str, Any] | None:
        rows = self._rows(f"SELECT {RUN_COLUMNS} FROM {DB}.runs FINAL WHERE run_id = {{run_id:String}}",
                          run_id=run_id)
        return run_row(rows[0]) if rows else None

    def missing_events(self, run_id: str) -> dict[str, int]:
        """Events of the run's sources that never arrived, by topic: every source numbers its events per run and
        topic from 0, so below the highest stored number, what is not stored is missing (a gap that no
        producer filled: it ended, or dropped it)."""
        out = {}
        for kind, table, col in (("metrics", "metric_points", "seq"), ("logs", "log_lines", "eseq")):
            rows = self._rows(f"""SELECT sum(toInt64(hi) + 1 - toInt64(n)) FROM (SELECT max({col}) AS hi,
                                  uniqExact({col}) AS n FROM {DB}.{table} WHERE run_id = {{run_id:String}} GROUP BY src)""",
                              run_id=run_id)
            out[kind] = int(rows[0][0] or 0) if rows else 0
        return out

    def stored_seqs(self, src: str, run_ids: list[str]) -> dict[str, int]:
        """Per run, the highest event seq of one source whose points are stored (a read API without the sink)."""
        rows = self._rows(f"""SELECT run_id, max(seq) FROM {DB}.metric_points WHERE run_id IN {{runs:Array(String)}}
                              AND src = {{src:String}} GROUP BY run_id""", runs=run_ids, src=src)
        return {r: int(s) for r, s in rows}

    def run_exists(self, run_id: str) -> bool:
        """Whether the run is stored at all: one row of any version, without FINAL (what a 404 needs)."""
        return bool(self._rows(f"SELECT 1 FROM {DB}.runs WHERE run_id = {{run_id:String}} LIMIT 1", run_id=run_id))

    def children(self, run_id: str, recursive: bool = False) -> list[dict[str, Any]]:
        out, frontier = [], [run_id]
        while frontier:
            rows = [run_row(r) for r in self._rows(
                f"SELECT {RUN_COLUMNS} FROM {DB}.runs FINAL WHERE parent_run_id IN {{ids:Array(String)}} "
                "ORDER BY created_time", ids=frontier)]
            out += rows
            frontier = [r["run_id"] for r in rows] if recursive else []
        return out

    def history(self, run_id: str) -> list[dict[str, Any]]:
        rows = self._rows(f"""SELECT ts, from_status, to_status, applied, reason FROM {DB}.status_history FINAL
                              WHERE run_id = {{run_id:String}} ORDER BY ts""", run_id=run_id)
        return [{"ts": _iso(ts), "from": f or None, "to": t, "applied": bool(a), "reason": reason}
                for ts, f, t, a, reason in rows]

    # -- log files ------------------------------------------------------------------------------
    def log_files(self, run_id: str) -> list[dict[str, Any]]:
        rows = self._rows(f"""
            SELECT file, min(node), min(rank), uniqExact(seq), sum(length(line) + 1), max(seq), max(ts)
            FROM {DB}.log_lines WHERE run_id = {{run_id:String}} GROUP BY file ORDER BY file""", run_id=run_id)
        return [{"name": f, "node": int(n), "rank": int(r), "lines": int(c), "bytes": int(b), "last_seq": int(s),
                 "last_ts": _iso(ts), "kind": "log"} for f, n, r, c, b, s, ts in rows]

    def run_files(self, run_id: str) -> dict[str, dict[str, Any]]:
        """What the pipeline says about a run's stored files: {name: {origin, size, sha256, ts}}."""
        rows = self._rows(f"""SELECT name, origin, size, sha256, ts FROM {DB}.run_files FINAL
                              WHERE run_id = {{run_id:String}}""", run_id=run_id)
        return {n: {"origin": o, "size": int(sz), "sha256": sha, "ts": _iso(ts)} for n, o, sz, sha, ts in rows}

    def log_lines(self, run_id: str, file: str, after_seq: int = -1, limit: int = 1000,
                  tail: int | None = None) -> dict[str, Any]:
        """Lines of one log file after `after_seq` (paged by sequence number), or its last `tail` lines."""
        base = f"""SELECT seq, ts, stream, node, rank, line FROM {DB}.log_lines
                   WHERE run_id = {{run_id:String}} AND file = {{file:String}}"""
        if tail is not None:
            sql = f"""SELECT * FROM ({base} ORDER BY seq DESC LIMIT 1 BY seq LIMIT {{n:UInt32}}) ORDER BY seq"""
            rows = self._rows(sql, run_id=run_id, file=file, n=int(tail))
        else:
            sql = f"{base} AND seq > {{after:Int64}} ORDER BY seq LIMIT 1 BY seq LIMIT {{n:UInt32}}"
            rows = self._rows(sql, run_id=run_id, file=file, after=int(after_seq), n=int(limit))
        lines = [{"seq": int(s), "ts": _iso(ts), "stream": st, "node": int(n), "rank": int(r), "line": ln}
                 for s, ts, st, n, r, ln in rows]
        return {"file": file, "lines": lines, "next_seq": lines[-1]["seq"] if lines else int(after_seq)}

    # -- alerts ---------------------------------------------------------------------------------
    def alerts(self, run_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        where, params = "1", {"limit": int(limit)}
        if run_id is not None:
            where = "run_id = {run_id:String}"
            params["run_id"] = run_id
        rows = self._rows(f"""SELECT alert_id, run_id, experiment, ts, status, reason, details FROM {DB}.alerts FINAL
                              WHERE {where} ORDER BY ts DESC LIMIT {{limit:UInt32}}""", **params)
        return [{"alert_id": a, "run_id": r, "experiment": e, "ts": _iso(ts), "status": st, "reason": reason,
                 "details": json.loads(d) if d else {}} for a, r, e, ts, st, reason, d in rows]

    def dead_letters(self, run_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        where, params = "1", {"limit": int(limit)}
        if run_id is not None:
            where = "run_id = {run_id:String}"
            params["run_id"] = run_id
        rows = self._rows(f"""SELECT ts, run_id, topic, partition, offset, reason FROM {DB}.dead_letters
                              WHERE {where} ORDER BY ts DESC LIMIT {{limit:UInt32}}""", **params)
        return [{"ts": _iso(ts), "run_id": r, "topic": t, "partition": int(p), "offset": int(o), "reason": reason}
                for ts, r, t, p, o, reason in rows]

    # -- compute --------------------------------------------------------------------------------
    def compute(self, slots: dict[str, int], name: str | None = None) -> list[dict[str, Any]]:
        """Each compute target with its queued and active submitted runs (oldest first) and the slots they hold."""
        where = "status IN {active:Array(String)} AND run_type = {script_run:String}"
        params: dict[str, Any] = {"active": sorted(ACTIVE), "script_run": SCRIPT_RUN}
        if name is not None:
            where += " AND compute_target = {target:String}"
            params["target"] = name
        rows = self._rows(f"SELECT {RUN_COLUMNS} FROM {DB}.runs FINAL WHERE {where} ORDER BY created_time", **params)
        targets = {t: {"name": t, "slots": n, "queued": [], "running": [], "slots_in_use": 0}
                   for t, n in slots.items() if name in (None, t)}
        for r in map(run_row, rows):
            t = targets.setdefault(r["compute_target"], {"name": r["compute_target"], "slots": None, "queued": [],
                                                         "running": [], "slots_in_use": 0})
            procs = _int(r["properties"].get(PROCESSES_PROPERTY), 1)
            entry = {k: r[k] for k in ("run_id", "experiment", "status", "created_time", "start_time")}
            entry["processes"] = procs
            if r["status"] == "Queued":
                t["queued"].append(entry)
            else:
                t["running"].append(entry)
                t["slots_in_use"] += procs
        return sorted(targets.values(), key=lambda t: t["name"])

    # -- metrics ------------------------------------------------------------------------------
    def aggregates(self, run_ids: list[str], names: list[str] | None = None,
                   experiment: str | None = None) -> dict[str, dict[str, Any]]:
        """{run_id: {metric: aggregate}} for `run_ids`; all of them of `experiment` when it is given."""
        if experiment is not None:
            where = "experiment = {experiment:String}"
            params: dict[str, Any] = {"experiment": experiment}
        else:
            where = "run_id IN {ids:Array(String)}"
            params = {"ids": run_ids}
        if names:
            where += " AND name IN {names:Array(String)}"
            params["names"] = names
        rows = self._rows(f"""SELECT run_id, name, column, {agg_columns()}
                              FROM {DB}.metric_aggregates FINAL WHERE {where}""", **params)
        out: dict[str, dict[str, Any]] = {}
        wanted = set(run_ids)
        for run_id, name, column, kind, count, mn, mx, first, last, last_text, last_step in rows:
            if run_id not in wanted:
                continue
            key = f"{name}.{column}" if column else name
            out.setdefault(run_id, {})[key] = _aggregate(kind, count, mn, mx, first, last, last_text, last_step)
        return out

    def metrics(self, run_id: str, name: str | None = None, recursive: bool = False, live=None,
                system: bool = False) -> dict[str, Any]:
        """Azure's get_metrics() shape; recursive: {run_id: metrics} for the run and its descendants. System metrics
        (names under `system/`) only with `system` or when asked for by name.

        `live(run_ids)` (the worker's live tail, runwatch/api/live.py) gives the runs' events the sink has not stored
        yet; their points are shown with the stored ones."""
        if recursive:
            ids = [run_id] + [r["run_id"] for r in self.children(run_id, recursive=True)]
            per_run = self._metrics_for(ids, name, live, system)
            return {rid: per_run.get(rid, {}) for rid in ids}
        return self._metrics_for([run_id], name, live, system).get(run_id, {})

    def _metrics_for(self, run_ids: list[str], name: str | None, live=None,
                     system: bool = False) -> dict[str, dict[str, Any]]:
        where = "run_id IN {ids:Array(String)}"
        params: dict[str, Any] = {"ids": run_ids}
        if name is not None:
            where += " AND name = {name:String}"
            params["name"] = name
        elif not system:
            where += " AND NOT startsWith(name, {system:String})"
            params["system"] = SYSTEM_PREFIX
        # asked before the query: an event stored meanwhile is then in both, and is dropped from the tail's
        # side by its (source, seq) below; asked after, it could be in neither
        pending = live(run_ids) if live is not None else {}
        if not pending:
            rows = self.client.query(f"""
                SELECT run_id, name, kind, column, dtype, step, value, text FROM {DB}.metric_points
                WHERE {where} ORDER BY run_id, name, column, step, ts""", parameters=params).result_rows
        else:
            rows = self._with_pending(where, params, pending, name, system)
        out: dict[str, dict[str, Any]] = {}
        scalars: set[tuple[str, str]] = set()
        for run_id, name_, kind, column, dtype, _step, value, text in rows:
            v = _value(dtype, value, text)
            per = out.setdefault(run_id, {})
            if kind in ("row", "table"):
                per.setdefault(name_, {}).setdefault(column, []).append(v)
            else:
                per.setdefault(name_, []).append(v)
                if kind in ("scalar", "image"):
                    scalars.add((run_id, name_))
        for run_id, name_ in scalars:  # a metric logged once is its value, as in Azure
            values = out[run_id][name_]
            if len(values) == 1:
                out[run_id][name_] = values[0]
        tabled = [rid for rid, per in out.items() if any(isinstance(v, dict) for v in per.values())]
        if tabled:  # the tables' columns in the order they were logged, not the store's
            for rid, props in self.client.query(
                    f"""SELECT run_id, mapFilter((k, v) -> startsWith(k, {{prefix:String}}), properties)
                        FROM {DB}.runs FINAL WHERE run_id IN {{ids:Array(String)}}""",
                    parameters={"ids": tabled, "prefix": COLUMNS_PROPERTY_PREFIX}).result_rows:
                names.order_tables(out[rid], props)
        return out

    def _with_pending(self, where: str, params: dict[str, Any], pending: dict[str, list], name: str | None,
                      system: bool = False) -> list:
        """The stored points and the pending events' points, in the stored order (run, name, column, step, time)."""
        stored = self.client.query(f"""
            SELECT run_id, name, kind, column, dtype, step, value, text, toUnixTimestamp64Micro(ts), src, seq
            FROM {DB}.metric_points WHERE {where}""", parameters=params).result_rows
        have = {(r[0], r[9], r[10]) for r in stored}
        rows = [r[:9] for r in stored]
        for run_id, envs in pending.items():
            for env in envs:
                key = (run_id, env.source.key, env.seq)
                if key in have:
                    continue  # stored since the tail was asked
                have.add(key)  # a producer's repeat of it further on in the tail
                p = env.payload
                for idx, step, ts, values, texts in p.parts():
                    for i, st, t, v, text in zip(idx.tolist(), step.tolist(), ts.tolist(), values.tolist(),
                                                 itertools.repeat("") if texts is None else texts):
                        n = p.names[i]
                        if (n.name == name) if name is not None else (system or not names.is_system(n.name)):
                            rows.append((run_id, n.name, n.kind.value, n.column, n.dtype.value, st, v, text, t))
        rows.sort(key=lambda r: (r[0], r[1], r[3], r[5], r[8]))
        return [r[:8] for r in rows]

    # -- health ---------------------------------------------------------------------------------
    def storage(self) -> dict[str, dict[str, int]]:
        """Rows and bytes on disk per table (active parts)."""
        rows = self._rows(f"""SELECT table, sum(rows), sum(bytes_on_disk), sum(data_compressed_bytes)
                              FROM system.parts WHERE database = '{DB}' AND active GROUP BY table""")
        return {t: {"rows": int(n), "bytes_on_disk": int(b), "compressed_bytes": int(c)} for t, n, b, c in rows}




def _map_filters(where: list[str], params: dict[str, Any], column: str, prefix: str, items: list[str] | None) -> None:
    """Filters on a Map column (tags, properties): NAME (the key is there) or NAME=VALUE (there, with that
    value; NAME= is the key with the empty value)."""
    for i, item in enumerate(items or []):
        k, eq, v = item.partition("=")
        key = f"{prefix}k{i}"
        params[key] = k
        cond = f"mapContains({column}, {{{key}:String}})"
        if eq:
            params[f"{prefix}v{i}"] = v
            cond += f" AND {column}[{{{key}:String}}] = {{{prefix}v{i}:String}}"
        where.append(cond)


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def counts(storage: dict[str, dict[str, int]]) -> dict[str, int]:
    """Row counts of every runwatch table, from `Queries.storage()`."""
    return {t: storage.get(t, {}).get("rows", 0) for t in TABLES}


def _value(dtype: str, value: float, text: str) -> Any:
    if dtype == "str":
        return text
    if dtype == "int":
        return int(value) if value == value and abs(value) != math.inf else value
    if dtype == "bool":
        return bool(value)
    return value

"""Decoded events turned into Arrow tables, one per ClickHouse table (no per-point Python).

`RowBuilder.add(env)` either takes a whole event or raises `DataError` saying what is wrong with it and
leaves the builder as it was: the sink then dead-letters that one event and goes on. Every value that
reaches a table was checked here against the column's type, so building the tables cannot fail on data.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from runwatch.core.errors import FileError
from runwatch.core.events import (
    Alert,
    DeadLetter,
    Envelope,
    FileStored,
    LogBatch,
    MetricAggregates,
    MetricBatch,
    RunState,
    Transition,
)
from runwatch.core.names import safe_name
from runwatch.core.states import ALL

from .schema import DTYPE_CODES, KIND_CODES

TS = pa.timestamp("us", tz="UTC")
_UINT64_MAX = (1 << 64) - 1
#: DateTime64(6) holds years 1900-2299: the µs bounds of what a time column takes.
_TS_MIN_US, _TS_MAX_US = -2_208_988_800_000_000, 10_413_792_000_000_000


class DataError(ValueError):
    """An event the store cannot take as it is; the message says which field and why (its dead letter's reason)."""


class _Columns:
    """One Arrow table from many events' arrays, built once: numeric columns are concatenated, string
    columns become dictionary arrays whose dictionaries hold the events' few distinct values (run ids, metric
    names); a point costs a few bytes of int32 codes, never a Python string. (Building a table per event and
    concatenating them cost the sink more than ClickHouse's insert did: docs/performance.md.)"""

    def __init__(self, types: dict[str, pa.DataType], order_by: tuple[str, ...] = ()):
        self.types = types
        self.order_by = order_by
        self.arrays: dict[str, list[np.ndarray]] = defaultdict(list)
        self.dicts: dict[str, dict[str, int]] = defaultdict(dict)

    def __bool__(self) -> bool:
        return bool(self.arrays)

    def _code(self, col: str, value: str) -> int:
        d = self.dicts[col]
        return d.setdefault(value, len(d))

    def const(self, col: str, value: str, n: int) -> None:
        self.arrays[col].append(np.full(n, self._code(col, value), np.int32))

    def mapped(self, col: str, values: list[str], idx: np.ndarray) -> None:
        """values[idx[i]] for every i; `values` is a small table (a batch's names)."""
        codes = np.fromiter((self._code(col, v) for v in values), np.int32, len(values))
        self.arrays[col].append(codes[idx])

    def numbers(self, col: str, arr: np.ndarray) -> None:
        """A numeric column, or (an object array) a string column whose values are all different."""
        self.arrays[col].append(arr)

    def table(self) -> pa.Table:
        data = {col: np.concatenate(parts) if len(parts) > 1 else parts[0] for col, parts in self.arrays.items()}
        dicts = {col: list(d) for col, d in self.dicts.items()}
        if self.order_by:
            # Rows in the table's sort order let ClickHouse skip sorting the part (it checks, and sorts
            # what is not in order, so this is never a question of correctness): 90 ns a point less
            # (docs/performance.md). The dictionary columns of the key are ordered by rank of their
            # strings, then one stable sort keeps each series' steps in the order they came.
            key = np.zeros(len(next(iter(data.values()))), np.int64)
            for col in self.order_by:
                values = dicts[col]
                order = sorted(range(len(values)), key=values.__getitem__)
                rank = np.empty(len(values), np.int64)
                rank[order] = np.arange(len(values))
                key = key * len(values) + rank[data[col]]
            perm = np.argsort(key, kind="stable")
            data = {col: arr[perm] for col, arr in data.items()}
        cols = {}
        for col, arr in data.items():
            if col in dicts:
                cols[col] = pa.DictionaryArray.from_arrays(pa.array(arr), pa.array(dicts[col], pa.string()))
            else:
                cols[col] = pa.array(arr, self.types[col])
        return pa.table(cols)


# ------------------------------------------------------------------------------ value checks
def _str(field: str, v: Any, optional: bool = False) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise DataError(f"{field}: a string was expected, not {type(v).__name__}")
    return v


def _int(field: str, v: Any, lo: int = -(1 << 63), hi: int = (1 << 63) - 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise DataError(f"{field}: an integer was expected, not {type(v).__name__}")
    if not lo <= v <= hi:
        raise DataError(f"{field}: {v} is outside {lo}..{hi}")
    return v


def _float(field: str, v: Any) -> float:
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DataError(f"{field}: a number was expected, not {type(v).__name__}")
    try:
        return float(v)
    except OverflowError:
        raise DataError(f"{field}: {v} does not fit a float64") from None


def _us(field: str, seconds: Any, optional: bool = True) -> int | None:
    """Seconds since the epoch as µs for a DateTime64(6) column."""
    if seconds is None and optional:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise DataError(f"{field}: a time in seconds was expected, not {seconds!r}"[:300])
    us = int(seconds * 1e6)
    if not _TS_MIN_US <= us <= _TS_MAX_US:
        raise DataError(f"{field}: {seconds} is not a time between the years 1900 and 2299")
    return us


def _ts_us(field: str, us: Any) -> int:
    v = _int(field, us)
    if not _TS_MIN_US <= v <= _TS_MAX_US:
        raise DataError(f"{field}: {v} µs is not a time between the years 1900 and 2299")
    return v


def _str_map(field: str, v: Any, none_as_empty: bool = False) -> list[tuple[str, str]]:
    if not isinstance(v, dict):
        raise DataError(f"{field}: a map was expected, not {type(v).__name__}")
    out = []
    for k, x in v.items():
        if x is None and none_as_empty:
            x = ""
        out.append((_str(f"{field} key", k), _str(f"{field}[{str(k)[:50]!r}]", x)))
    return out


def _json(field: str, v: Any) -> str:
    try:
        return json.dumps(v, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{field}: not JSON: {exc}") from None


def _name(field: str, v: Any) -> str:
    try:
        return safe_name(v)
    except FileError as exc:
        raise DataError(f"{field}: {exc}") from None


# ------------------------------------------------------------------------------ the builder
class RowBuilder:
    """Turns decoded events into Arrow tables per ClickHouse table."""

    def __init__(self) -> None:
        self.points = _Columns({"step": pa.int64(), "ts": TS, "value": pa.float64(), "seq": pa.uint64(),
                                "kind": pa.int8(), "dtype": pa.int8()}, order_by=("run_id", "name", "column"))
        self.lines = _Columns({"node": pa.uint16(), "rank": pa.uint32(), "seq": pa.uint64(), "ts": TS,
                               "line": pa.string(), "eseq": pa.uint64()})
        self.rows: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def add(self, env: Envelope) -> None:
        """Take one event whole, or raise DataError and take nothing of it."""
        p = env.payload
        try:
            if isinstance(p, MetricBatch):
                self._metrics(env, p)
            elif isinstance(p, LogBatch):
                self._logs(env, p)
            else:
                build = _ROWS.get(type(p))
                if build is not None:
                    table, rows = build(env, p)
                    self.rows[table].extend(rows)
        except DataError:
            raise
        except Exception as exc:  # building is pure: whatever it meets is the event's own doing
            raise DataError(f"{p.kind}: {type(exc).__name__}: {exc}"[:1000]) from None

    def dead_letter(self, reason: str, topic: str, partition: int, offset: int, raw: bytes,
                    ts: float | None = None, run_id: str = "") -> None:
        self.rows["dead_letters"].append({
            "ts": int((ts or time.time()) * 1e6), "topic": topic, "partition": partition, "offset": offset,
            "reason": reason, "raw": raw[:4096].decode("utf-8", "backslashreplace"), "run_id": run_id})

    def _metrics(self, env: Envelope, p: MetricBatch) -> None:
        parts = p.parts()
        for _, step, ts, _, _ in parts:  # checked before anything is added
            if len(ts) and (int(ts.min()) < _TS_MIN_US or int(ts.max()) > _TS_MAX_US):
                raise DataError("metrics: a point's time is not between the years 1900 and 2299")
        c = self.points
        for idx, step, ts, val, texts in parts:
            self._metric_rows(env, p, idx, step, ts, val)
            if texts is None:
                c.const("text", "", len(idx))
            else:
                c.mapped("text", texts, np.arange(len(texts)))

    def _metric_rows(self, env, p: MetricBatch, idx, step, ts, val) -> None:
        c, n = self.points, len(idx)
        c.const("run_id", env.run_id, n)
        c.const("experiment", env.experiment, n)
        c.const("src", env.source.key, n)
        c.mapped("name", [x.name for x in p.names], idx)
        c.mapped("column", [x.column for x in p.names], idx)
        # the Enum8 columns take their numbers: parsing them from strings cost ClickHouse 20 ns a point each
        c.numbers("kind", np.array([KIND_CODES[x.kind.value] for x in p.names], np.int8)[idx])
        c.numbers("dtype", np.array([DTYPE_CODES[x.dtype.value] for x in p.names], np.int8)[idx])
        c.numbers("step", step)
        c.numbers("ts", ts)
        c.numbers("value", val)
        c.numbers("seq", np.full(n, env.seq, np.uint64))

    def _logs(self, env: Envelope, p: LogBatch) -> None:
        c, n = self.lines, len(p.lines)
        if not n:
            return
        file = _name("logs: file", p.file)
        ts = np.frombuffer(p.ts, "<i8")
        if int(ts.min()) < _TS_MIN_US or int(ts.max()) > _TS_MAX_US:
            raise DataError("logs: a line's time is not between the years 1900 and 2299")
        _int("logs: node", p.node, 0, 65535)
        _int("logs: rank", p.rank, 0, (1 << 32) - 1)
        for col, value in (("run_id", env.run_id), ("experiment", env.experiment), ("file", file),
                           ("stream", p.stream), ("src", env.source.key)):
            c.const(col, value, n)
        c.numbers("node", np.full(n, p.node, np.uint16))
        c.numbers("rank", np.full(n, p.rank, np.uint32))
        c.numbers("seq", np.arange(p.first_seq, p.first_seq + n, dtype=np.uint64))
        c.numbers("ts", ts)
        c.numbers("line", np.array(p.lines, dtype=object))
        c.numbers("eseq", np.full(n, env.seq, np.uint64))

    def tables(self) -> dict[str, pa.Table]:
        out: dict[str, pa.Table] = {}
        if self.points:
            out["metric_points"] = self.points.table()
        if self.lines:
            out["log_lines"] = self.lines.table()
        for name, rows in self.rows.items():
            if rows:
                out[name] = _rows_to_table(rows)
        return out


# ------------------------------------------------------------------------------ one row per event
def _aggregates(env: Envelope, p: MetricAggregates) -> tuple[str, list[dict[str, Any]]]:
    rows = []
    for i, r in enumerate(p.rows):
        f = f"aggregates row {i}"
        if not isinstance(r, dict):
            raise DataError(f"{f}: a map was expected")
        try:
            rows.append({
                "run_id": env.run_id, "experiment": env.experiment, "name": _str(f"{f} name", r["name"]),
                "column": _str(f"{f} column", r["column"]), "kind": _str(f"{f} kind", r["kind"]),
                "count": _int(f"{f} count", r["count"], 0, _UINT64_MAX), "min": _float(f"{f} min", r["min"]),
                "max": _float(f"{f} max", r["max"]), "first": _float(f"{f} first", r["first"]),
                "last": _float(f"{f} last", r["last"]), "last_text": _str(f"{f} last_text", r["last_text"]),
                "last_step": _int(f"{f} last_step", r["last_step"]), "last_ts": _ts_us(f"{f} last_ts", r["last_ts"]),
                "version": _int(f"{f} version", r["version"], 0, _UINT64_MAX)})
        except KeyError as exc:
            raise DataError(f"{f}: no {exc.args[0]!r}") from None
    return "metric_aggregates", rows


def _run_state(env: Envelope, p: RunState) -> tuple[str, list[dict[str, Any]]]:
    s = p.snapshot
    status = s.get("status") or "NotStarted"
    if status not in ALL:
        raise DataError(f"run_state status: {str(status)[:50]!r} is not a run state")
    tags = s.get("tags") or {}
    error = s.get("error")
    return "runs", [{
        "run_id": env.run_id, "experiment": _str("run_state experiment", s.get("experiment") or env.experiment),
        "display_name": _str("run_state display_name", s.get("display_name"), optional=True),
        "description": _str("run_state description", s.get("description"), optional=True),
        "parent_run_id": _str("run_state parent_run_id", s.get("parent_run_id"), optional=True),
        "run_type": _str("run_state run_type", s.get("run_type") or ""),
        "compute_target": _str("run_state compute_target", s.get("compute_target") or ""),
        "status": status, "created_time": _us("run_state created_ts", s.get("created_ts")),
        "start_time": _us("run_state start_ts", s.get("start_ts")), "end_time": _us("run_state end_ts", s.get("end_ts")),
        "properties": _str_map("run_state properties", s.get("properties") or {}),
        "tags": _str_map("run_state tags", tags, none_as_empty=True), "tags_json": _json("run_state tags", tags),
        "error": _json("run_state error", error) if error else "",
        "last_heartbeat": _us("run_state last_heartbeat", s.get("last_heartbeat")),
        "dropped_points": _int("run_state dropped_points", int(s.get("dropped_points") or 0), 0, _UINT64_MAX),
        "illegal_transitions": _int("run_state illegal_transitions", int(s.get("illegal_transitions") or 0), 0,
                                    _UINT64_MAX),
        "seen": _json("run_state seen", s.get("seen") or {}),
        "version": _int("run_state version", p.version, 0, _UINT64_MAX)}]


def _transition(env: Envelope, p: Transition) -> tuple[str, list[dict[str, Any]]]:
    return "status_history", [{
        "run_id": env.run_id, "experiment": env.experiment, "ts": _us("transition ts", env.ts, optional=False),
        "from_status": p.from_status.value if p.from_status else "", "to_status": p.to_status.value,
        "applied": int(p.applied), "reason": p.reason, "event_id": env.event_id}]


def _alert(env: Envelope, p: Alert) -> tuple[str, list[dict[str, Any]]]:
    return "alerts", [{
        "run_id": env.run_id, "experiment": env.experiment, "ts": _us("alert ts", env.ts, optional=False),
        "status": p.status.value, "reason": p.reason, "details": json.dumps(p.details, default=str),
        "alert_id": env.event_id}]


def _file(env: Envelope, p: FileStored) -> tuple[str, list[dict[str, Any]]]:
    return "run_files", [{
        "run_id": env.run_id, "experiment": env.experiment, "name": _name("file name", p.name), "size": p.size,
        "sha256": p.sha256, "content_type": p.content_type, "origin": p.origin,
        "ts": _us("file ts", env.ts, optional=False)}]


def _dead_letter(env: Envelope, p: DeadLetter) -> tuple[str, list[dict[str, Any]]]:
    return "dead_letters", [{
        "ts": _us("dead letter ts", env.ts, optional=False), "topic": p.topic, "partition": p.partition,
        "offset": p.offset, "reason": p.reason, "raw": p.raw[:4096].decode("utf-8", "backslashreplace"),
        "run_id": env.run_id}]


_ROWS: dict[type, Callable[[Envelope, Any], tuple[str, list[dict[str, Any]]]]] = {
    MetricAggregates: _aggregates, RunState: _run_state, Transition: _transition, Alert: _alert, FileStored: _file,
    DeadLetter: _dead_letter}

_TIMES = ("ts", "last_ts", "created_time", "start_time", "end_time", "last_heartbeat")
_UINTS = ("count", "version", "dropped_points", "illegal_transitions", "size")


def _rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    arrays = {}
    for k, v in cols.items():
        if k in _TIMES:
            arrays[k] = pa.array(v, pa.int64()).cast(TS)
        elif k in ("properties", "tags"):
            arrays[k] = pa.array(v, pa.map_(pa.string(), pa.string()))
        elif k in _UINTS:
            arrays[k] = pa.array(v, pa.uint64())
        elif k in ("min", "max", "first", "last"):
            arrays[k] = pa.array(v, pa.float64())
        elif k in ("partition",):
            arrays[k] = pa.array(v, pa.int32())
        elif k in ("offset", "last_step"):
            arrays[k] = pa.array(v, pa.int64())
        elif k in ("applied",):
            arrays[k] = pa.array(v, pa.uint8())
        else:
            arrays[k] = pa.array(v)
    return pa.table(arrays)


__all__ = ["RowBuilder", "DataError", "TS"]

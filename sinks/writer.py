"""The ClickHouse sink: consumes the topics, inserts in batches, commits offsets only after ClickHouse took them.

Idempotence: every insert carries a deduplication token naming its topic, partition and
offset range. Before inserting, the sink records that range (an *intent*) in
`sink_intents`; after a crash between insert and commit it finds the intent that starts
at the committed offset and replays exactly that range with the same token, so ClickHouse
drops the repeat. Events repeated by a producer (a resend after a lost ack, a spool
resent after a crash) are dropped by (source, seq).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from runwatch.core.events import (
    Alert,
    DeadLetter,
    Envelope,
    EventError,
    FileStored,
    LogBatch,
    MetricAggregates,
    MetricBatch,
    RunState,
    Transition,
    decode,
)
from runwatch.core.settings import Settings
from runwatch.core.states import TERMINAL

from .schema import DTYPE_CODES, KIND_CODES

log = logging.getLogger("runwatch.sink")

DB = "runwatch"
TS = pa.timestamp("us", tz="UTC")
SINK_TOPICS = ("metrics", "logs", "aggregates", "alerts", "dlq")


@dataclass
class SinkStats:
    batches: int = 0
    events: int = 0
    rows: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    repeats_dropped: int = 0
    rejected: int = 0
    dead_letters: int = 0
    insert_retries: int = 0
    aggregates_checked: int = 0
    aggregates_repaired: int = 0
    last_insert_ts: float = 0.0
    lag: dict[str, int] = field(default_factory=dict)


def _us(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1e6)


@dataclass
class _Prepared:
    """One chunk of a fetch, decoded and built, waiting for its insert."""

    ranges: dict[Any, tuple[int, int, list]]
    #: a range replayed under a recorded intent is in it: ClickHouse may rightly drop its rows as a repeat
    replay: bool = False
    tables: list[tuple[str, dict[str, pa.Table]]] = field(default_factory=list)  # (dedup token, tables)
    seen: dict[tuple[str, str, str], int] = field(default_factory=dict)
    events: int = 0
    repeats: int = 0
    rejected: int = 0
    finished: list[str] = field(default_factory=list)


def _chunks(ranges: dict[Any, tuple[int, int, list]], max_bytes: int, whole: set) -> list[dict]:
    """Split a fetch's ranges into chunks of at most `max_bytes` of event bytes (one event at least), each
    with at most one contiguous range per partition; ranges in `whole` are never split."""
    chunks: list[dict] = []
    current: dict = {}
    size = 0
    for tp, (_, _, msgs) in ranges.items():
        if tp in whole:
            chunks.append({tp: ranges[tp]})
            continue
        lo = 0
        for i, m in enumerate(msgs):
            n = len(m.value or b"")
            if size + n > max_bytes and (i > lo or current):
                if i > lo:
                    current[tp] = (msgs[lo].offset, msgs[i - 1].offset, msgs[lo:i])
                chunks.append(current)
                current, size, lo = {}, 0, i
            size += n
        current[tp] = (msgs[lo].offset, msgs[-1].offset, msgs[lo:])
    if current:
        chunks.append(current)
    return chunks


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


class RowBuilder:
    """Turns decoded events into Arrow tables per ClickHouse table (no per-point Python)."""

    def __init__(self) -> None:
        self.points = _Columns({"step": pa.int64(), "ts": TS, "value": pa.float64(), "seq": pa.uint64(),
                                "kind": pa.int8(), "dtype": pa.int8()}, order_by=("run_id", "name", "column"))
        self.lines = _Columns({"node": pa.uint16(), "rank": pa.uint32(), "seq": pa.uint64(), "ts": TS,
                               "line": pa.string(), "eseq": pa.uint64()})
        self.rows: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def add(self, env: Envelope) -> None:
        p = env.payload
        if isinstance(p, MetricBatch):
            self._metrics(env, p)
        elif isinstance(p, LogBatch):
            self._logs(env, p)
        elif isinstance(p, MetricAggregates):
            for r in p.rows:
                self.rows["metric_aggregates"].append({
                    "run_id": env.run_id, "experiment": env.experiment, "name": r["name"], "column": r["column"],
                    "kind": r["kind"], "count": r["count"], "min": r["min"], "max": r["max"], "first": r["first"],
                    "last": r["last"], "last_text": r["last_text"], "last_step": r["last_step"],
                    "last_ts": r["last_ts"], "version": r["version"]})
        elif isinstance(p, RunState):
            s = p.snapshot
            tags = s.get("tags") or {}
            self.rows["runs"].append({
                "run_id": env.run_id, "experiment": s.get("experiment") or env.experiment,
                "display_name": s.get("display_name"), "parent_run_id": s.get("parent_run_id"),
                "run_type": s.get("run_type") or "", "compute_target": s.get("compute_target") or "",
                "status": s.get("status") or "NotStarted", "created_time": _us(s.get("created_ts")),
                "start_time": _us(s.get("start_ts")), "end_time": _us(s.get("end_ts")),
                "properties": list((s.get("properties") or {}).items()),
                "tags": [(k, "" if v is None else v) for k, v in tags.items()],
                "tags_json": json.dumps(tags), "error": json.dumps(s["error"]) if s.get("error") else "",
                "last_heartbeat": _us(s.get("last_heartbeat")), "dropped_points": int(s.get("dropped_points") or 0),
                "illegal_transitions": int(s.get("illegal_transitions") or 0), "version": p.version})
        elif isinstance(p, Transition):
            self.rows["status_history"].append({
                "run_id": env.run_id, "experiment": env.experiment, "ts": _us(env.ts),
                "from_status": p.from_status.value if p.from_status else "", "to_status": p.to_status.value,
                "applied": int(p.applied), "reason": p.reason, "event_id": env.event_id})
        elif isinstance(p, Alert):
            self.rows["alerts"].append({
                "run_id": env.run_id, "experiment": env.experiment, "ts": _us(env.ts), "status": p.status.value,
                "reason": p.reason, "details": json.dumps(p.details, default=str), "alert_id": env.event_id})
        elif isinstance(p, FileStored):
            self.rows["run_files"].append({
                "run_id": env.run_id, "experiment": env.experiment, "name": p.name, "size": p.size,
                "sha256": p.sha256, "content_type": p.content_type, "origin": p.origin, "ts": _us(env.ts)})
        elif isinstance(p, DeadLetter):
            self.dead_letter(p.reason, p.topic, p.partition, p.offset, p.raw, ts=env.ts)

    def dead_letter(self, reason: str, topic: str, partition: int, offset: int, raw: bytes,
                    ts: float | None = None) -> None:
        self.rows["dead_letters"].append({
            "ts": _us(ts or time.time()), "topic": topic, "partition": partition, "offset": offset,
            "reason": reason, "raw": raw[:4096].decode("utf-8", "backslashreplace")})

    def _metrics(self, env: Envelope, p: MetricBatch) -> None:
        c = self.points
        for idx, step, ts, val, texts in p.parts():
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
        for col, value in (("run_id", env.run_id), ("experiment", env.experiment), ("file", p.file),
                           ("stream", p.stream), ("src", env.source.key)):
            c.const(col, value, n)
        c.numbers("node", np.full(n, p.node, np.uint16))
        c.numbers("rank", np.full(n, p.rank, np.uint32))
        c.numbers("seq", np.arange(p.first_seq, p.first_seq + n, dtype=np.uint64))
        c.numbers("ts", np.frombuffer(p.ts, "<i8"))
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
                out[name] = _rows_to_table(name, rows)
        return out


def _rows_to_table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    arrays = {}
    for k, v in cols.items():
        if k in ("ts", "last_ts", "created_time", "start_time", "end_time", "last_heartbeat"):
            arrays[k] = pa.array(v, TS)
        elif k in ("properties", "tags"):
            arrays[k] = pa.array(v, pa.map_(pa.string(), pa.string()))
        elif k in ("count", "version", "dropped_points", "illegal_transitions", "size"):
            arrays[k] = pa.array(v, pa.uint64())
        elif k in ("min", "max", "first", "last"):
            arrays[k] = pa.array([math.nan if x is None else x for x in v], pa.float64())
        else:
            arrays[k] = pa.array(v)
    return pa.table(arrays)


def _chdb_handle(client):
    """The chDB engine handle of a clickhouse-connect client on chDB (with its lock); None elsewhere."""
    handle = getattr(getattr(client, "_backend", None), "_handle", None)
    return handle if hasattr(getattr(handle, "conn", None), "send_insert") else None


def insert_arrow(client, table: str, data: pa.Table, settings: dict[str, Any]) -> None:
    """Insert an Arrow table. On chDB, stream it to the engine as ArrowStream through the client's own
    connection and lock: clickhouse-connect's chDB backend writes every insert to a temporary file first,
    which cost the sink a fifth of its time (docs/performance.md). Elsewhere, the client's insert_arrow."""
    handle = _chdb_handle(client)
    if handle is None:
        client.insert_arrow(table, data, settings=settings)
        return
    conn = handle.conn
    clause = ", ".join(f"{k} = {_sql_value(v)}" for k, v in settings.items())
    cols = ", ".join(f"`{c}`" for c in data.column_names)
    with handle.lock:
        with conn.send_insert(f"INSERT INTO {table} ({cols}) SETTINGS {clause}", "ArrowStream") as ins:
            # The IPC stream goes to the engine piece by piece as pyarrow writes it (each buffer of batches
            # of at most 256 k rows). Written whole first, a 600 k-point insert took a 35 MB buffer, fresh
            # from the kernel each time (zero-filled, page-faulted), and chDB copied it once more into bytes:
            # 40 ms of the sink's Python thread, with the interpreter lock held; now 5 ms.
            with pa.ipc.new_stream(pa.PythonFile(_Appender(ins), mode="w"), data.schema) as w:
                w.write_table(data, max_chunksize=1 << 18)
            ins.finish()


class _Appender:
    """A write-only file for pyarrow that hands every piece to a chDB insert stream."""

    closed = False

    def __init__(self, ins) -> None:
        self.ins = ins

    def write(self, data) -> int:
        self.ins.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


class DiskFullError(RuntimeError):
    """The disk holding chDB has less free space than `sink_min_free_mb`."""


class InsertLostError(RuntimeError):
    """ClickHouse reported an insert as done that is not in the table."""


#: tables of plain MergeTree without a TTL: a merge never lowers their rows, so an insert's rows must all show
#: (sink_intents' TTL merges drop week-old rows, which would read as a loss: only its new part is checked)
APPEND_ONLY = frozenset({"metric_points", "log_lines", "dead_letters"})


def _chdb_dir(client) -> str | None:
    """The directory of a client's chDB engine; None for a ClickHouse server or chDB in memory."""
    path = getattr(client, "path", None)
    return path if _chdb_handle(client) is not None and isinstance(path, str) and os.path.isdir(path) else None


def _sql_value(v: Any) -> str:
    if isinstance(v, (int, float)):
        return str(v)
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


class ClickHouseSink:
    """Consumes SINK_TOPICS with manual commits and writes them to ClickHouse."""

    def __init__(self, settings: Settings, client, bootstrap: str, group_id: str | None = None, lookup=None):
        self.settings = settings
        self.client = client
        #: another client (on chDB: its own handle; the worker passes the read API's) for the build thread's
        #: lookups, which would otherwise wait for the insert thread's hold on the first
        self.lookup = lookup or client
        self.bootstrap = bootstrap
        self.group_id = group_id or f"{settings.topic_prefix}sink"
        self.stats = SinkStats()
        self.consumer = None
        self.ready = False
        self.error: str | None = None
        #: ranges to write again exactly as before, with the same tokens: tp -> (last offset, replay). A replay
        #: (an intent found after a crash) may be stored already, so ClickHouse may rightly drop its rows; a
        #: retry (a chunk that failed in this process) is checked, since what of it is stored is known (`_kept`)
        self._forced_end: dict[Any, tuple[int, bool]] = {}
        self._pending: dict[Any, list] = defaultdict(list)
        self._last_seq: dict[tuple[str, str, str], int] = {}
        #: per partition, the first offset not stored yet (the live tail keeps watched runs' events from there)
        self._stored_next: dict[Any, int] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="runwatch-sink")
        self._build_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="runwatch-sink-build")
        self._topic_kind = {settings.topic(t): t for t in SINK_TOPICS}
        # Fault injection for the reliability suite only (docs/reliability.md); unset in normal use.
        fault = os.environ.get("RUNWATCH_TEST_FAULT", "")
        kind, _, arg = fault.partition(":")
        self._crash_after_inserts = int(arg) if kind == "crash-after-insert" else 0
        self._fail_after_inserts = int(arg) if kind == "fail-after-insert" else 0
        self._clickhouse_down_file = Path(arg) if kind == "clickhouse-down-while" else None
        self._inserts = 0
        #: the embedded chDB's directory (free space is checked, inserts verified); None on a ClickHouse server
        self._chdb_dir = _chdb_dir(client)
        #: (token, table) of the inserts of a chunk verified as stored before a later one of it failed, and of
        #: those made whose check failed
        self._kept: set[tuple[str, str]] = set()
        self._unchecked: set[tuple[str, str]] = set()
        #: finished runs whose aggregates are to be checked against their stored points: run_id -> (due, tries)
        self._to_check: dict[str, tuple[float, int]] = {}
        self._next_check = 0.0

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", max_partition_fetch_bytes=16 << 20, fetch_max_bytes=64 << 20,
            client_id=f"{self.group_id}-consumer", **self.settings.kafka_args())
        await self.consumer.start()
        # every topic's partitions, from the cluster's metadata; a topic created a moment ago may not be in
        # it yet (Apache Kafka propagates metadata asynchronously): ask again rather than guess
        deadline = time.monotonic() + 30
        while True:
            parts = await self._partitions()
            if all(parts.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        missing = [t for t, p in parts.items() if not p]
        if missing:
            raise RuntimeError(f"runwatch sink: no partitions known for topic(s) {', '.join(missing)}")
        tps = [TopicPartition(self.settings.topic(t), p) for t in SINK_TOPICS for p in sorted(parts[t])]
        self.consumer.assign(tps)
        await self._recover(tps)
        self.ready = True

    async def _partitions(self) -> dict[str, set[int]]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=f"{self.group_id}-admin",
                                    request_timeout_ms=self.settings.request_timeout_ms, **self.settings.kafka_args())
        await admin.start()
        try:
            described = await admin.describe_topics([self.settings.topic(t) for t in SINK_TOPICS])
        finally:
            await admin.close()
        by_name = {d["topic"]: {p["partition"] for p in d.get("partitions") or []}
                   for d in described if not d.get("error_code")}
        return {t: by_name.get(self.settings.topic(t), set()) for t in SINK_TOPICS}

    async def _recover(self, tps) -> None:
        """Find intents that start at the committed offsets: those ranges are replayed with their tokens."""
        starts = {}
        for tp in tps:
            committed = await self.consumer.committed(tp)
            starts[tp] = committed if committed is not None else 0
        rows = await self._run(lambda: self.client.query(
            f"SELECT topic, partition, start_offset, argMax(end_offset, ts) FROM {DB}.sink_intents "
            "WHERE group_id = {g:String} AND topic IN {topics:Array(String)} AND start_offset IN {starts:Array(Int64)} "
            "GROUP BY topic, partition, start_offset",
            parameters={"g": self.group_id, "topics": sorted({tp.topic for tp in tps}),
                        "starts": sorted(set(starts.values()))}).result_rows)
        intents = {(t, p, s): e for t, p, s, e in rows}
        self._stored_next.update(starts)
        for tp, start in starts.items():
            end = intents.get((tp.topic, tp.partition, start))
            if end is not None:
                self._forced_end[tp] = (int(end), True)
                log.warning("runwatch sink: replaying %s[%d] offsets %d..%d after an unfinished commit",
                            tp.topic, tp.partition, start, end)

    def stored_offset(self, tp) -> int:
        """The first offset of `tp` not stored yet (0 before the sink knows)."""
        return self._stored_next.get(tp, 0)

    def metrics_partitions(self) -> list:
        """The `metrics` partitions this sink reads, once it is ready."""
        if not self.ready or self.consumer is None:
            return []
        topic = self.settings.topic("metrics")
        return sorted((tp for tp in self.consumer.assignment() if tp.topic == topic), key=lambda tp: tp.partition)

    async def _run(self, fn):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def run_forever(self) -> None:
        backoff = 0.5
        while True:
            try:
                if self.consumer is None:
                    await self.start()
                batch = await self.consumer.getmany(timeout_ms=int(self.settings.sink_max_wait * 1000),
                                                    max_records=self.settings.sink_max_batch_events)
                if batch:
                    await self.process(batch)
                now = time.time()
                if self._to_check and now >= self._next_check and min(d for d, _ in self._to_check.values()) <= now:
                    # at most once a second: runs finishing one after another are checked together, not
                    # each with its own query while the sink is busiest
                    self._next_check = now + 1.0
                    await self._run(self._check_aggregates_safely)
                await self._update_lag()
                self.error = None
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # ClickHouse or the broker away: wait, keep everything, try again
                self.error = f"{type(exc).__name__}: {exc}"
                self.stats.insert_retries += 1
                log.warning("runwatch sink: %s; retrying in %.1fs", self.error, backoff)
                await self._rewind()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _rewind(self) -> None:
        """After a failed batch: go back to the committed offsets so nothing is skipped."""
        if self.consumer is None:
            return
        try:
            for tp in self.consumer.assignment():
                committed = await self.consumer.committed(tp)
                if committed is None:
                    await self.consumer.seek_to_beginning(tp)
                else:
                    self.consumer.seek(tp, committed)
            self._pending.clear()
        except Exception:
            await self.stop()

    async def _update_lag(self) -> None:
        try:
            for tp in self.consumer.assignment():
                hw = self.consumer.highwater(tp)
                pos = await self.consumer.position(tp)
                if hw is not None:
                    self.stats.lag[f"{tp.topic}[{tp.partition}]"] = max(0, hw - pos)
        except Exception:
            pass

    async def process(self, batch: dict) -> None:
        ranges: dict[Any, tuple[int, int, list]] = {}
        whole: set = set()  # forced ranges: inserted as they were, never split
        replayed: set = set()  # of them, those replayed after a crash
        for tp, msgs in batch.items():
            if tp in self._forced_end:
                forced, replay = self._forced_end[tp]
                self._pending[tp].extend(msgs)
                got = self._pending[tp]
                if got[-1].offset < forced:
                    continue  # keep collecting until the whole recorded range is here
                msgs = [m for m in got if m.offset <= forced]
                del self._pending[tp]
                del self._forced_end[tp]
                self.consumer.seek(tp, forced + 1)
                whole.add(tp)
                if replay:
                    replayed.add(tp)
            if msgs:
                ranges[tp] = (msgs[0].offset, msgs[-1].offset, msgs)
        if not ranges:
            return
        # One fetch can hold millions of points. It is written as chunks of at most sink_max_batch_bytes,
        # each with its own intent and offset commit, and in a pipeline: the next chunk is decoded and built
        # (Python) while this one is inserted (ClickHouse's threads) -- one big batch at a time left a core
        # idle and made everything in it wait for all of it (docs/performance.md).
        chunks = _chunks(ranges, self.settings.sink_max_batch_bytes, whole)
        loop = asyncio.get_running_loop()
        nxt = loop.run_in_executor(self._build_pool, self._prepare, chunks[0], {})
        try:
            for i, chunk in enumerate(chunks):
                ready = await nxt
                ready.replay = any(tp in replayed for tp in chunk)
                nxt = (loop.run_in_executor(self._build_pool, self._prepare, chunks[i + 1], ready.seen)
                       if i + 1 < len(chunks) else None)
                try:
                    await self._run(lambda: self._insert(ready))
                except Exception:
                    # a later fetch could cut this range elsewhere, and its rows stored so far would come again
                    # under other tokens: the retry writes exactly this chunk's ranges
                    self._forced_end.update({tp: (end, False) for tp, (_, end, _) in chunk.items()})
                    raise
                await self.consumer.commit({tp: end + 1 for tp, (_, end, _) in chunk.items()})
                self.stats.batches += 1
                self.stats.last_insert_ts = time.time()
            # a retried chunk comes back as one chunk per range, maybe over several fetches: once all are written,
            # what was kept of it is no longer needed
            if all(replay for _, replay in self._forced_end.values()):
                self._kept.clear()
                self._unchecked.clear()
        finally:
            if nxt is not None:  # a chunk failed: the one built ahead is dropped (the stream rewinds)
                await asyncio.gather(nxt, return_exceptions=True)

    # -- runs in the sink's threads --------------------------------------------------------
    def _prepare(self, ranges: dict[Any, tuple[int, int, list]], before: dict) -> "_Prepared":
        """Decode and build one chunk's tables (the build thread). `before`: the repeat-check state of the
        chunk ahead of this one, not yet inserted."""
        decoded = {tp: self._decode(tp, msgs) for tp, (_, _, msgs) in ranges.items()}
        self._seed_seqs([env for envs in decoded.values() for env, _ in envs if env is not None])
        ready = _Prepared(ranges)
        for tp, (start, end, _) in ranges.items():
            builder = RowBuilder()
            kind = self._topic_kind.get(tp.topic, "")
            for env, m in decoded[tp]:
                if env is None:
                    builder.dead_letter(m[1], tp.topic, tp.partition, m[0].offset, m[0].value or b"")
                    continue
                if kind in ("metrics", "logs") and self._is_repeat(kind, env, ready.seen, before):
                    ready.repeats += 1
                    continue
                if isinstance(env.payload, MetricBatch) and len(env.payload.names) > self.settings.max_metric_names:
                    ready.rejected += 1  # a cardinality bomb: the processors send it to the dlq with the reason
                    continue
                builder.add(env)
                ready.events += 1
                if isinstance(env.payload, RunState) and env.payload.snapshot.get("status") in TERMINAL:
                    ready.finished.append(env.run_id)
            ready.tables.append((f"{self.group_id}:{tp.topic}:{tp.partition}:{start}:{end}", builder.tables()))
        return ready

    def _insert(self, ready: "_Prepared") -> None:
        """Write one prepared chunk: its intent first, then its tables (the insert thread)."""
        if self._clickhouse_down_file is not None and self._clickhouse_down_file.exists():
            raise ConnectionError("ClickHouse is unavailable (injected by RUNWATCH_TEST_FAULT)")
        if self._chdb_dir is not None:
            self._check_free_space()
        ranges = ready.ranges
        # on chDB every insert is checked (`_insert_one`), except where ClickHouse may rightly drop a replayed range
        verify = self._chdb_dir is not None and not ready.replay
        parts = self._stored_parts() if verify else {}
        # through the same path as the data (on chDB: no temporary file for every batch's intent)
        intent = ",".join(f"{tp.topic}:{tp.partition}:{start}:{end}" for tp, (start, end, _) in ranges.items())
        self._insert_one(intent, "sink_intents", pa.table({
            "group_id": pa.array([self.group_id] * len(ranges)), "topic": pa.array([tp.topic for tp in ranges]),
            "partition": pa.array([tp.partition for tp in ranges], pa.int32()),
            "start_offset": pa.array([start for start, _, _ in ranges.values()], pa.int64()),
            "end_offset": pa.array([end for _, end, _ in ranges.values()], pa.int64())}), None, parts, verify)
        for token, tables in ready.tables:
            for table, data in tables.items():
                self._insert_one(token, table, data, {
                    "insert_deduplication_token": token, "async_insert": 0, "insert_deduplicate": 1}, parts, verify)
        if self._fail_after_inserts and self._inserts + 1 == self._fail_after_inserts:
            self._fail_after_inserts = 0
            raise RuntimeError("failing after a chunk's inserts, before its commit (injected by RUNWATCH_TEST_FAULT)")
        for token, tables in ready.tables:
            for table, data in tables.items():
                self.stats.rows[table] += data.num_rows
                if table == "dead_letters":
                    self.stats.dead_letters += data.num_rows
        # counted, and the repeat check's state kept, only once every insert of the chunk succeeded
        self._last_seq.update(ready.seen)
        for tp, (_, end, _) in ranges.items():
            self._stored_next[tp] = end + 1
        self.stats.events += ready.events
        self.stats.repeats_dropped += ready.repeats
        self.stats.rejected += ready.rejected
        due = time.time() + self.settings.aggregates_check_delay
        for run_id in ready.finished:
            self._to_check.setdefault(run_id, (due, 0))
        self._inserts += 1
        if self._crash_after_inserts and self._inserts >= self._crash_after_inserts:
            log.error("runwatch sink: crashing after an insert, before its offset commit (RUNWATCH_TEST_FAULT)")
            os._exit(137)

    def _free_mb(self) -> float:
        st = os.statvfs(self._chdb_dir)
        return st.f_bavail * st.f_frsize / (1 << 20)

    def _check_free_space(self) -> None:
        free_mb = self._free_mb()
        if free_mb < self.settings.sink_min_free_mb:
            raise DiskFullError(
                f"only {free_mb:,.0f} MiB free on the disk of {self._chdb_dir} (the sink keeps "
                f"sink_min_free_mb = {self.settings.sink_min_free_mb:,}); nothing is written until there is "
                "room, and the broker keeps the events")

    def _insert_one(self, token: str, table: str, data: pa.Table, settings: dict[str, Any] | None,
                    parts: dict[str, tuple[int, int]], verify: bool) -> None:
        """One insert of a chunk. Verified (on chDB), it must show as a new part (a higher block number: a
        merge keeps the highest of its parts) and, in the tables that never replace rows, as its rows; only
        the sink writes these tables, on this thread. chDB reported a streaming insert as written and kept
        nothing when the disk was nearly full. A verified insert is not made again when its chunk is retried
        (ClickHouse would drop the repeat, and the check would take that for a loss)."""
        if data.num_rows == 0 or (token, table) in self._kept:
            return
        insert_arrow(self.client, f"{DB}.{table}", data, settings or {"async_insert": 0})
        if not verify or (token, table) in self._unchecked:
            return  # made once already without a check: ClickHouse may rightly drop it now as a repeat
        rows0, block0 = parts.get(table, (0, 0))
        try:
            after = self._stored_parts(table)
        except Exception:
            self._unchecked.add((token, table))
            raise
        rows1, block1 = parts[table] = after.get(table, (0, 0))
        if block1 <= block0 or (table in APPEND_ONLY and rows1 - rows0 < data.num_rows):
            raise InsertLostError(
                f"ClickHouse took an insert into {table} and stored {max(0, rows1 - rows0):,} of its "
                f"{data.num_rows:,} rows ({self._free_mb():,.0f} MiB free on the disk of "
                f"{self._chdb_dir}); nothing is committed, and the chunk is written again")
        self._kept.add((token, table))

    def _stored_parts(self, table: str | None = None) -> dict[str, tuple[int, int]]:
        """Per table: the rows in its active parts and their highest block number."""
        where = "" if table is None else f" AND table = '{table}'"
        return {t: (int(rows), int(block)) for t, rows, block in self.client.query(
            f"SELECT table, sum(rows), max(max_block_number) FROM system.parts WHERE database = '{DB}' AND active"
            f"{where} GROUP BY table").result_rows}

    def _check_aggregates_safely(self) -> None:
        """A check that fails must never hold up the stream: the runs are looked at again later."""
        try:
            self.check_aggregates()
        except Exception as exc:
            log.warning("runwatch sink: checking finished runs' aggregates failed (%s: %s); trying again later",
                        type(exc).__name__, exc)
            later = time.time() + self.settings.aggregates_check_delay
            self._to_check = {r: (max(when, later), tries + 1) for r, (when, tries) in self._to_check.items()
                              if tries < 5}

    def check_aggregates(self) -> None:
        """Check the running aggregates of runs that finished a while ago against their stored points, and
        recompute the ones that fell short from the points themselves.

        The processors may skip a batch after a crash (Faust acknowledges what it could not finish,
        DESIGN.md); the points are all stored (the sink's offsets follow ClickHouse), so they are the
        truth. Only a shortfall is repaired (fewer points counted than stored): more counted than stored
        means the sink is still behind, and the run is checked again later.
        """
        now = time.time()
        due = [r for r, (when, _) in self._to_check.items() if when <= now]
        if not due:
            return
        # one thread: the check counts every point of the runs (10 M for 1,000 runs of 10,000 points) and
        # is never in a hurry; the other core stays with the read API's queries and the pipeline
        rows = self.client.query(f"""
            SELECT p.run_id, p.name, p.column, p.n, a.count
            FROM (SELECT run_id, name, column, count() AS n FROM {DB}.metric_points
                  WHERE run_id IN {{runs:Array(String)}} GROUP BY run_id, name, column) AS p
            LEFT JOIN (SELECT run_id, name, column, count FROM {DB}.metric_aggregates FINAL
                       WHERE run_id IN {{runs:Array(String)}}) AS a USING (run_id, name, column)
            SETTINGS join_use_nulls = 1, max_threads = 1""", parameters={"runs": due}).result_rows
        short = sorted({r[0] for r in rows if r[4] is None or r[3] > r[4]})
        behind = {r[0] for r in rows if r[4] is not None and r[3] < r[4]}
        self.stats.aggregates_checked += len(due)
        if short:
            # min and max ignore NaN (NaN only when every value is); first and last by time, as the processors,
            # and among points of one microsecond by arrival (event seq, then step: a fast loop logs several)
            self.client.command(f"""
                INSERT INTO {DB}.metric_aggregates
                SELECT p.run_id, p.experiment, p.name, p.column, p.kind, p.count, p.min, p.max, p.first, p.last,
                       p.last_text, p.last_step, p.last_ts, ifNull(a.version, 0) + 1
                FROM (SELECT run_id, any(experiment) AS experiment, name, column, toString(any(kind)) AS kind,
                             count() AS count,
                             if(countIf(dtype != 'str' AND NOT isNaN(value)) = 0, nan,
                                minIf(value, dtype != 'str' AND NOT isNaN(value))) AS min,
                             if(countIf(dtype != 'str' AND NOT isNaN(value)) = 0, nan,
                                maxIf(value, dtype != 'str' AND NOT isNaN(value))) AS max,
                             argMin(value, (ts, seq, step)) AS first, argMax(value, (ts, seq, step)) AS last,
                             argMaxIf(text, (ts, seq, step), dtype = 'str') AS last_text,
                             argMax(step, (ts, seq, step)) AS last_step, max(ts) AS last_ts
                      FROM {DB}.metric_points WHERE run_id IN {{runs:Array(String)}}
                      GROUP BY run_id, name, column) AS p
                LEFT JOIN (SELECT run_id, name, column, count, version FROM {DB}.metric_aggregates FINAL
                           WHERE run_id IN {{runs:Array(String)}}) AS a USING (run_id, name, column)
                WHERE a.count IS NULL OR p.count > a.count
                SETTINGS join_use_nulls = 1, async_insert = 0""", parameters={"runs": short})
            self.stats.aggregates_repaired += len(short)
            log.warning("runwatch sink: the running aggregates of %d finished run(s) fell short of their stored "
                        "points (a batch skipped after a crash); recomputed from the points: %s",
                        len(short), ", ".join(short[:10]))
        for run_id in due:
            _, tries = self._to_check.pop(run_id)
            if run_id in behind and tries < 5:  # the sink has not stored every point yet: look again later
                self._to_check[run_id] = (now + self.settings.aggregates_check_delay, tries + 1)

    def _decode(self, tp, msgs) -> list[tuple[Envelope | None, Any]]:
        out = []
        kind = self._topic_kind.get(tp.topic, "")
        for m in msgs:
            try:
                out.append((decode(m.value), m))
            except EventError as exc:
                if kind in ("metrics",):
                    continue  # the processors read this topic too and send it to the dlq with the reason
                out.append((None, (m, str(exc))))
        return out

    def _is_repeat(self, kind: str, env: Envelope, seen: dict, before: dict) -> bool:
        key = (kind, env.run_id, env.source.key)
        last = seen.get(key)
        if last is None:
            last = before.get(key, self._last_seq.get(key))
        if last is not None and env.seq <= last:
            return True
        seen[key] = env.seq
        return False

    def _seed_seqs(self, envs: list[Envelope]) -> None:
        """Learn the last stored seq of (run, source) pairs this sink has not seen since it started."""
        wanted: dict[str, set[str]] = defaultdict(set)
        for env in envs:
            kind = "metrics" if isinstance(env.payload, MetricBatch) else "logs" if isinstance(env.payload, LogBatch) else None
            if kind and (kind, env.run_id, env.source.key) not in self._last_seq:
                wanted[kind].add(env.run_id)
        for kind, runs in wanted.items():
            table, col = ("metric_points", "seq") if kind == "metrics" else ("log_lines", "eseq")
            rows = self.lookup.query(
                f"SELECT run_id, src, max({col}) FROM {DB}.{table} WHERE run_id IN {{runs:Array(String)}} "
                "GROUP BY run_id, src", parameters={"runs": sorted(runs)}).result_rows
            for run_id, src, seq in rows:
                self._last_seq.setdefault((kind, run_id, src), int(seq))

    async def stop(self) -> None:
        consumer, self.consumer = self.consumer, None
        self.ready = False
        if consumer is not None:
            try:
                await consumer.stop()
            except Exception:
                pass

"""The store writer: `ClickHouseStore.write(batch)` puts one batch of tables into ClickHouse, idempotently.

A batch is written as its *intents* (the topic ranges it holds, in `sink_intents`) and then its tables,
each insert carrying a deduplication token that names its range: written again after a crash, ClickHouse
drops the repeat. On the embedded chDB every insert is checked in `system.parts` (chDB reported inserts
as written that a nearly full disk had lost), and nothing is written while the disk is nearly full.

Errors are of two kinds, handled apart by the sink: `TransientError` (the store cannot take it now: wait,
keep everything, write again) and anything else, which may be the data's fault (the sink then writes the
batch event by event to find the one to dead-letter; `probe()` tells the two apart).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from runwatch.core.seqs import SeqSet
from runwatch.core.settings import Settings

DB = "runwatch"
#: tables of plain MergeTree without a TTL: a merge never lowers their rows, so an insert's rows must all show
#: (sink_intents' TTL merges drop week-old rows, which would read as a loss: only its new part is checked)
APPEND_ONLY = frozenset({"metric_points", "log_lines", "dead_letters"})


class TransientError(RuntimeError):
    """The store cannot take the batch now (away, disk full, an insert not kept): retried, nothing is lost."""


class DiskFullError(TransientError):
    """The disk holding chDB has less free space than `sink_min_free_mb`."""


class InsertLostError(TransientError):
    """ClickHouse reported an insert as done that is not in the table."""


@dataclass
class WriteBatch:
    """What the store writes at once: the ranges it covers, and per range (token) its tables."""

    #: (intent group, topic, partition, first offset, last offset)
    intents: list[tuple[str, str, int, int, int]]
    #: (deduplication token, {table: rows}); the token names the range its rows came from
    tables: list[tuple[str, dict[str, pa.Table]]] = field(default_factory=list)
    #: a range replayed under an intent found after a crash: ClickHouse may rightly drop its rows as repeats,
    #: so its inserts are not verified
    replay: bool = False


def is_transient(exc: BaseException) -> bool:
    """Errors that say the store (or the way to it) is away, not that the data is wrong."""
    if isinstance(exc, (TransientError, OSError, TimeoutError)):  # ConnectionError is an OSError
        return True
    try:
        from clickhouse_connect.driver.exceptions import OperationalError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, OperationalError)


class _ChdbInserter:
    """Inserts streamed to the embedded engine as ArrowStream, on a connection of our own (chDB allows many
    handles to one engine in a process): clickhouse-connect's chDB backend writes every insert to a temporary
    file first, which cost the sink a fifth of its time (docs/performance.md)."""

    def __init__(self, path: str):
        import chdb

        self.conn = chdb.connect(os.path.realpath(path))
        self.lock = threading.Lock()

    def insert(self, table: str, data: pa.Table, settings: dict[str, Any]) -> None:
        clause = ", ".join(f"{k} = {_sql_value(v)}" for k, v in settings.items())
        cols = ", ".join(f"`{c}`" for c in data.column_names)
        with self.lock:
            with self.conn.send_insert(f"INSERT INTO {table} ({cols}) SETTINGS {clause}", "ArrowStream") as ins:
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


def _sql_value(v: Any) -> str:
    if isinstance(v, (int, float)):
        return str(v)
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


def chdb_path(client) -> str | None:
    """The directory of a clickhouse-connect client's chDB engine; None for a server or chDB in memory."""
    if not str(getattr(client, "uri", "")).startswith("chdb://"):
        return None
    path = getattr(client, "path", None)
    return path if isinstance(path, str) and os.path.isdir(path) else None


class ClickHouseStore:
    """Writes batches into ClickHouse (`client`); `lookup` (another client) answers the sink's reads, so that
    they never wait behind an insert."""

    def __init__(self, client, settings: Settings, lookup=None):
        self.client = client
        self.lookup = lookup or client
        self.settings = settings
        #: the embedded chDB's directory (free space is checked, inserts verified); None on a ClickHouse server
        self.chdb_dir = chdb_path(client)
        self._inserter = _ChdbInserter(self.chdb_dir) if self.chdb_dir else None
        #: (token, table) of the inserts of a batch verified as stored before a later one of it failed, and of
        #: those made whose check failed: a retried batch does not make them again
        self._kept: set[tuple[str, str]] = set()
        self._unchecked: set[tuple[str, str]] = set()
        self.inserts = 0

    # -- writing ------------------------------------------------------------------------------
    def write(self, batch: WriteBatch) -> None:
        """Write one batch: its intents first, then its tables. Safe to call again with the same batch after
        any failure: what was verified as stored is not made again, the rest carries the same tokens."""
        if self.chdb_dir is not None:
            self._check_free_space()
        verify = self.chdb_dir is not None and not batch.replay
        parts = self._stored_parts() if verify else {}
        intent_token = ",".join(f"{t}:{p}:{s}:{e}" for _, t, p, s, e in batch.intents)
        if batch.intents:
            self._insert_one(intent_token, "sink_intents", pa.table({
                "group_id": pa.array([i[0] for i in batch.intents]), "topic": pa.array([i[1] for i in batch.intents]),
                "partition": pa.array([i[2] for i in batch.intents], pa.int32()),
                "start_offset": pa.array([i[3] for i in batch.intents], pa.int64()),
                "end_offset": pa.array([i[4] for i in batch.intents], pa.int64())}), None, parts, verify)
        for token, tables in batch.tables:
            for table, data in tables.items():
                self._insert_one(token, table, data, {
                    "insert_deduplication_token": token, "async_insert": 0, "insert_deduplicate": 1}, parts, verify)
        self.inserts += 1

    def done(self) -> None:
        """The batch last written is committed: what was kept for its retry is no longer needed."""
        self._kept.clear()
        self._unchecked.clear()

    def insert(self, table: str, data: pa.Table, settings: dict[str, Any] | None = None) -> None:
        """One plain insert (the aggregates' repair); streamed on chDB."""
        self._insert(f"{DB}.{table}", data, settings or {"async_insert": 0})

    def _insert(self, table: str, data: pa.Table, settings: dict[str, Any]) -> None:
        if self._inserter is not None:
            self._inserter.insert(table, data, settings)
        else:
            self.client.insert_arrow(table, data, settings=settings)

    def _free_mb(self) -> float:
        st = os.statvfs(self.chdb_dir)
        return st.f_bavail * st.f_frsize / (1 << 20)

    def _check_free_space(self) -> None:
        free_mb = self._free_mb()
        if free_mb < self.settings.sink_min_free_mb:
            raise DiskFullError(
                f"only {free_mb:,.0f} MiB free on the disk of {self.chdb_dir} (the sink keeps "
                f"sink_min_free_mb = {self.settings.sink_min_free_mb:,}); nothing is written until there is "
                "room, and the broker keeps the events")

    def _insert_one(self, token: str, table: str, data: pa.Table, settings: dict[str, Any] | None,
                    parts: dict[str, tuple[int, int]], verify: bool) -> None:
        """One insert of a batch. Verified (on chDB), it must show as a new part (a higher block number: a
        merge keeps the highest of its parts) and, in the tables that never replace rows, as its rows; only
        the sink writes these tables, on this thread. chDB reported a streaming insert as written and kept
        nothing when the disk was nearly full. A verified insert is not made again when its batch is retried
        (ClickHouse would drop the repeat, and the check would take that for a loss)."""
        if data.num_rows == 0 or (token, table) in self._kept:
            return
        self._insert(f"{DB}.{table}", data, settings or {"async_insert": 0})
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
                f"{self.chdb_dir}); nothing is committed, and the chunk is written again")
        self._kept.add((token, table))

    def _stored_parts(self, table: str | None = None) -> dict[str, tuple[int, int]]:
        """Per table: the rows in its active parts and their highest block number."""
        where = "" if table is None else f" AND table = '{table}'"
        return {t: (int(rows), int(block)) for t, rows, block in self.client.query(
            f"SELECT table, sum(rows), max(max_block_number) FROM system.parts WHERE database = '{DB}' AND active"
            f"{where} GROUP BY table").result_rows}

    # -- reading ------------------------------------------------------------------------------
    def probe(self) -> None:
        """Raise if the store does not answer (tells a store that is away from data it refuses)."""
        self.lookup.query("SELECT 1")

    def intents(self, group: str, topics: list[str], starts: list[int]) -> dict[tuple[str, int, int], int]:
        """{(topic, partition, first offset): last offset} of the recorded intents of `group` starting there."""
        rows = self.client.query(
            f"SELECT topic, partition, start_offset, argMax(end_offset, ts) FROM {DB}.sink_intents "
            "WHERE group_id = {g:String} AND topic IN {topics:Array(String)} AND start_offset IN {starts:Array(Int64)} "
            "GROUP BY topic, partition, start_offset",
            parameters={"g": group, "topics": sorted(set(topics)), "starts": sorted(set(starts))}).result_rows
        return {(t, int(p), int(s)): int(e) for t, p, s, e in rows}

    def stored_seqs(self, kind: str, run_ids: list[str]) -> dict[tuple[str, str], SeqSet]:
        """What is stored of each (run, source) of these runs: the event sequence numbers of their points
        (`metrics`) or log lines (`logs`)."""
        table, col = ("metric_points", "seq") if kind == "metrics" else ("log_lines", "eseq")
        out: dict[tuple[str, str], SeqSet] = {}
        holes = []
        for run_id, src, hi, n in self.lookup.query(
                f"SELECT run_id, src, max({col}), uniqExact({col}) FROM {DB}.{table} "
                "WHERE run_id IN {runs:Array(String)} GROUP BY run_id, src",
                parameters={"runs": sorted(set(run_ids))}).result_rows:
            if int(n) == int(hi) + 1:  # 0..hi, the usual case
                out[(run_id, src)] = SeqSet(int(hi))
            else:
                holes.append((run_id, src))
        for run_id, src in holes:
            seqs = self.lookup.query(
                f"SELECT DISTINCT {col} FROM {DB}.{table} WHERE run_id = {{r:String}} AND src = {{s:String}}",
                parameters={"r": run_id, "s": src}).result_rows
            out[(run_id, src)] = SeqSet.from_stored([int(q) for (q,) in seqs])
        return out

    def query(self, sql: str, **params: Any) -> list[tuple]:
        return self.lookup.query(sql, parameters=params).result_rows


__all__ = ["ClickHouseStore", "WriteBatch", "TransientError", "DiskFullError", "InsertLostError", "is_transient",
           "chdb_path", "DB"]

"""The live tail: points of runs someone is reading, taken from the stream before the sink has stored them.

When the sink is behind (a burst from many trainers on shared cores), every run's newest points wait
for the whole backlog ahead of them in their partition: seconds. The read API serves a run's metrics
from ClickHouse plus this tail, so the run a widget, `get_metrics()` or a probe is polling shows its
newest points as soon as they reach the broker, whatever the sink's backlog.

How: a second consumer (no group, nothing committed) reads the `metrics` topic from the sink's stored
position onwards and keeps, in memory, the decoded events of *watched* runs (read through the API in
the last `live_watch_seconds`); it picks them out by message key (the run id) without decoding the
rest. An event leaves the tail once the sink has stored its offset. Nothing here is ever written:
the tail changes what a read shows a moment sooner, never what is stored, so the sink's guarantees
(docs/reliability.md) do not depend on it. Runs nobody reads cost nothing: without a watched run the
consumer is closed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from runwatch.core.events import Envelope, EventError, MetricBatch, decode
from runwatch.core.retry import Backoff
from runwatch.core.settings import Settings

log = logging.getLogger("runwatch.live")


@dataclass
class LiveStats:
    #: events of watched runs taken into the tail (a rescan counts them again)
    events: int = 0
    #: messages read from the broker, watched or not
    read: int = 0
    #: times a run's tail was dropped because the tail would have held more than live_max_points
    overflows: int = 0


class LiveTail:
    """Watched runs' metric events from the sink's stored offset to the end of each partition.

    `stored_next(tp)` gives the first offset of partition `tp` the sink has not stored yet.
    """

    def __init__(self, settings: Settings, bootstrap: str, stored_next, partitions):
        self.settings = settings
        self.bootstrap = bootstrap
        self._stored_next = stored_next
        #: the `metrics` partitions to read (the sink's assignment, known once it is ready)
        self._partitions = partitions
        self.stats = LiveStats()
        self.consumer = None
        self._lock = threading.Lock()  # the API's threads read and watch; the event loop fills
        self._watched: dict[str, float] = {}  # run_id -> monotonic time the watch ends
        self._rescan = False
        self._events: dict[str, dict[tuple[Any, int], Envelope]] = defaultdict(dict)  # run -> {(tp, offset): event}
        self._held = 0  # points held, all runs
        #: runs whose tail overflowed: taken up again once the sink has stored past (tp, offset)
        self._overflowed: dict[str, tuple[Any, int]] = {}
        self._pos: dict[Any, int] = {}

    # -- called from the read API's threads ---------------------------------------------------
    def pending(self, run_ids: list[str]) -> dict[str, list[Envelope]]:
        """Watch these runs, and give the events of theirs not stored yet, in offset order per partition."""
        until = time.monotonic() + self.settings.live_watch_seconds
        out: dict[str, list[Envelope]] = {}
        with self._lock:
            for run_id in run_ids:
                if run_id not in self._watched:
                    if len(self._watched) >= self.settings.live_max_runs:
                        continue
                    self._rescan = True  # read its events from the sink's stored offset on
                self._watched[run_id] = until
            for run_id in run_ids:
                held = self._events.get(run_id)
                if not held:
                    continue
                envs = [env for (tp, off), env in sorted(held.items()) if off >= self._stored_next(tp)]
                if envs:
                    out[run_id] = envs
        return out

    # -- the event loop's task ----------------------------------------------------------------
    async def run_forever(self) -> None:
        backoff = Backoff(first=1.0, most=10.0)
        while True:
            try:
                if not await self.step():
                    await asyncio.sleep(0.1)
                backoff.reset()
            except asyncio.CancelledError:
                await self.close()
                raise
            except Exception as exc:  # the broker away: the reads show what is stored meanwhile
                wait = backoff.next()
                log.warning("runwatch live tail: %s: %s; again in %.0f s", type(exc).__name__, exc, wait)
                await self.close()
                await asyncio.sleep(wait)

    async def step(self) -> bool:
        """One fetch; False when there is nothing to do (no watched run, or the sink not ready yet)."""
        now = time.monotonic()
        with self._lock:
            for run_id in [r for r, until in self._watched.items() if until < now]:
                del self._watched[run_id]
                self._drop(run_id)
                self._overflowed.pop(run_id, None)
            keys = frozenset(r.encode() for r in self._watched)  # message keys are run ids
        parts = self._partitions()
        if not keys or not parts:
            if self.consumer is not None:
                await self.close()
            return False
        if self.consumer is None:
            await self._open(parts)
        floors = {tp: self._stored_next(tp) for tp in parts}
        with self._lock:
            rescan, self._rescan = self._rescan, False
            for run_id, (tp, off) in list(self._overflowed.items()):
                if floors[tp] > off:
                    del self._overflowed[run_id]  # the sink stored what was dropped: take the run up again
                    rescan = True
        for tp in parts:
            if rescan or self._pos.get(tp, -1) < floors[tp]:
                self.consumer.seek(tp, floors[tp])
                self._pos[tp] = floors[tp]
        batch = await self.consumer.getmany(timeout_ms=100, max_records=5000)
        limit = self.settings.live_max_points
        for tp, msgs in batch.items():
            self.stats.read += len(msgs)
            for m in msgs:
                self._pos[tp] = m.offset + 1
                if m.key not in keys:
                    continue
                try:
                    env = decode(m.value)
                except EventError:
                    continue  # the processors and the sink say what was wrong with it
                p = env.payload
                if not isinstance(p, MetricBatch) or len(p.names) > self.settings.max_metric_names:
                    continue
                with self._lock:
                    run_id = env.run_id
                    if run_id not in self._watched or run_id in self._overflowed:
                        continue
                    if (tp, m.offset) in self._events[run_id]:
                        continue
                    n = _points(env)
                    if self._held + n > limit:
                        # reads show the stored points alone (no gap) until the sink is past this offset
                        self._overflowed[run_id] = (tp, m.offset)
                        self._drop(run_id)
                        self.stats.overflows += 1
                        continue
                    self._events[run_id][(tp, m.offset)] = env
                    self._held += n
                    self.stats.events += 1
        self._prune(floors)
        return True

    def _drop(self, run_id: str) -> None:
        self._held -= sum(_points(env) for env in self._events.pop(run_id, {}).values())

    def _prune(self, floors: dict) -> None:
        """Let go of the events the sink has stored."""
        with self._lock:
            for run_id, held in list(self._events.items()):
                for k in [k for k in held if k[1] < floors.get(k[0], 0)]:
                    self._held -= _points(held.pop(k))
                if not held:
                    del self._events[run_id]

    async def _open(self, parts) -> None:
        from aiokafka import AIOKafkaConsumer

        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
            auto_offset_reset="latest", fetch_max_wait_ms=50, max_partition_fetch_bytes=16 << 20,
            fetch_max_bytes=64 << 20, client_id=f"{self.settings.topic_prefix}live-tail",
            **self.settings.kafka_args())
        await self.consumer.start()
        self.consumer.assign(list(parts))
        self._pos.clear()

    async def close(self) -> None:
        consumer, self.consumer = self.consumer, None
        self._pos.clear()
        with self._lock:
            self._events.clear()
            self._held = 0
        await _stop(consumer)

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {"watched": len(self._watched), "held_points": self._held,
                    "events": self.stats.events, "read": self.stats.read, "overflows": self.stats.overflows}


async def _stop(consumer) -> None:
    """Stop a tail's consumer; a broker gone away meanwhile is no error of the tail's."""
    if consumer is not None:
        try:
            await consumer.stop()
        except Exception:
            pass


def _points(env: Envelope) -> int:
    return env.payload.n_numeric + env.payload.n_text


#: Seconds a run event stays in the run tail: far longer than the pipeline takes to store it, even under load.
RUN_TAIL_SECONDS = 120.0
#: Run events held at most, all runs (each a few hundred bytes: tags, a status).
RUN_TAIL_MAX_EVENTS = 100_000


class RunTail:
    """The `runs` topic's recent events, so that a run's record read through the API shows them before the
    processors and the sink have stored their outcome (tags, properties, names, status).

    Under a metric backlog the worker's processors and sink each take seconds to turn a tag into a stored
    record (docs/performance.md, "Read-your-writes"); the `runs` topic itself is light. This consumer reads it
    from its end, always, and keeps each run's events for RUN_TAIL_SECONDS. A read of a run applies the held
    events to the stored record with the processors' own logic (RunStateLogic: the rules live there once);
    what the record has already seen (per source, by seq) is a repeat to the logic and changes nothing.
    Nothing here is ever written: the stored record is the truth, the tail only shows it a moment sooner.
    """

    #: the events that change what a run's record shows (heartbeats and liveness are the processors' alone)
    KINDS = ("run_created", "status", "tags", "properties", "run_updated")

    def __init__(self, settings: Settings, bootstrap: str):
        self.settings = settings
        self.bootstrap = bootstrap
        self.consumer = None
        self._lock = threading.Lock()
        self._events: dict[str, list[tuple[float, Envelope]]] = defaultdict(list)  # run -> [(arrived, event)]
        self._held = 0
        self.read = 0
        self.overlaid = 0

    def pending(self, run_id: str) -> list[Envelope]:
        with self._lock:
            return [env for _, env in self._events.get(run_id, ())]

    def overlay(self, run_id: str, stored: dict[str, Any] | None) -> dict[str, Any] | None:
        """The stored record (the read API's shape) with the run's held events applied, or `stored` itself
        when they add nothing."""
        events = self.pending(run_id)
        if not events:
            return stored
        from runwatch.processors.logic import Rejected, RunStateLogic

        st = _state_of(stored) if stored is not None else RunStateLogic.new_state(run_id, events[0].experiment)
        version = st["version"]
        logic = RunStateLogic()
        limit = self.settings.processor_max_message_bytes // 4
        for env in events:
            try:
                size = RunStateLogic.check_size(st, env, limit)  # what the processors refuse is not shown
            except Rejected:
                continue
            logic.handle(env, st, now=env.ts)
            if size is not None:
                st["size"] = size
        if st["version"] == version:
            return stored  # all of them are in the stored record already
        if stored is None and st["status"] is None:
            return None
        self.overlaid += 1
        return _row_of(st, stored)

    async def run_forever(self) -> None:
        backoff = Backoff(first=1.0, most=10.0)
        while True:
            try:
                if self.consumer is None:
                    await self._open()
                batch = await self.consumer.getmany(timeout_ms=200, max_records=5000)
                now = time.monotonic()
                with self._lock:
                    for msgs in batch.values():
                        self.read += len(msgs)
                        for m in msgs:
                            try:
                                env = decode(m.value)
                            except EventError:
                                continue
                            if env.kind in self.KINDS:
                                self._events[env.run_id].append((now, env))
                                self._held += 1
                    self._prune(now)
                backoff.reset()
            except asyncio.CancelledError:
                await self._close()
                raise
            except Exception as exc:  # the broker away: reads show what is stored meanwhile
                wait = backoff.next()
                log.warning("runwatch run tail: %s: %s; again in %.0f s", type(exc).__name__, exc, wait)
                await self._close()
                await asyncio.sleep(wait)

    def _prune(self, now: float) -> None:
        cutoff = now - RUN_TAIL_SECONDS
        for run_id in list(self._events):
            held = self._events[run_id]
            keep = [e for e in held if e[0] >= cutoff]
            self._held -= len(held) - len(keep)
            if keep:
                self._events[run_id] = keep
            else:
                del self._events[run_id]
        while self._held > RUN_TAIL_MAX_EVENTS and self._events:  # the oldest runs' events go first
            oldest = min(self._events, key=lambda r: self._events[r][0][0])
            self._held -= len(self._events.pop(oldest))

    async def _open(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        topic = self.settings.topic("runs")
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="latest",
            fetch_max_wait_ms=50, client_id=f"{self.settings.topic_prefix}run-tail", **self.settings.kafka_args())
        await consumer.start()
        try:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(topic)
            if not parts:
                raise RuntimeError(f"no partitions known for topic {topic}")
            consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
        except BaseException:
            await consumer.stop()
            raise
        self.consumer = consumer

    async def _close(self) -> None:
        consumer, self.consumer = self.consumer, None
        await _stop(consumer)

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {"runs": len(self._events), "events": self._held, "read": self.read, "overlaid": self.overlaid}


def _epoch(iso: str | None) -> float | None:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp() if iso else None


def _iso(ts: float | None) -> str | None:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00") if ts else None


def _state_of(row: dict[str, Any]) -> dict[str, Any]:
    """A stored record (the read API's shape) as the processors' run state (RunStateLogic.new_state's)."""
    import copy

    return {
        "run_id": row["run_id"], "experiment": row["experiment"], "display_name": row.get("display_name"),
        "description": row.get("description"), "parent_run_id": row.get("parent_run_id"),
        "run_type": row.get("run_type"), "compute_target": row.get("compute_target"), "status": row["status"],
        "created_ts": _epoch(row.get("created_time")), "start_ts": _epoch(row.get("start_time")),
        "end_ts": _epoch(row.get("end_time")), "properties": dict(row.get("properties") or {}),
        "tags": dict(row.get("tags") or {}), "error": copy.deepcopy(row.get("error")), "last_heartbeat": None,
        "last_seen": None, "not_responding_since": None, "dropped_points": row.get("dropped_points", 0),
        "illegal_transitions": row.get("illegal_transitions", 0), "version": row.get("version", 0),
        "seen": copy.deepcopy(row.get("seen") or {}),
    }


def _row_of(st: dict[str, Any], stored: dict[str, Any] | None) -> dict[str, Any]:
    """The run state as the read API's record (queries.run_row's keys)."""
    start, end = st["start_ts"], st["end_ts"]
    row = dict(stored or {})
    row.update({
        "run_id": st["run_id"], "experiment": st["experiment"], "display_name": st["display_name"],
        "description": st["description"], "parent_run_id": st["parent_run_id"], "run_type": st["run_type"],
        "compute_target": st["compute_target"], "status": st["status"] or "NotStarted",
        "created_time": _iso(st["created_ts"]), "start_time": _iso(start), "end_time": _iso(end),
        "duration_s": (end - start) if start and end else None, "properties": st["properties"], "tags": st["tags"],
        "error": st["error"], "dropped_points": int(st["dropped_points"] or 0),
        "illegal_transitions": int(st["illegal_transitions"] or 0), "version": st["version"], "seen": st["seen"],
    })
    return row

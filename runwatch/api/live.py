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
        if consumer is not None:
            try:
                await consumer.stop()
            except Exception:
                pass

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {"watched": len(self._watched), "held_points": self._held,
                    "events": self.stats.events, "read": self.stats.read, "overflows": self.stats.overflows}


def _points(env: Envelope) -> int:
    return env.payload.n_numeric + env.payload.n_text

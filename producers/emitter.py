"""The background batching producer: one daemon thread per process owns an asyncio loop and the Kafka producer.

`Run.log()` appends a tuple to a plain list (`Emitter.buf`) and returns; this module
turns those tuples into per-run columnar MetricBatch events every `flush_interval`,
sends them with acks=all, and spools them to disk while the broker is away.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import itertools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runwatch.core.events import (
    Envelope,
    Heartbeat,
    MetricBatch,
    MetricName,
    encode,
    make_envelope,
    this_source,
)
from runwatch.core import kafka
from runwatch.core.settings import Settings

from .spool import Record, Spool, spool_dir_for

log = logging.getLogger("runwatch.producer")

#: Bytes of control events kept in memory when the spool's disk refuses them (status, tags, drop counts).
HELD_MAX_BYTES = 1 << 20
#: Points per metric-batch message: 100 k points are about 2.8 MB before compression.
MAX_POINTS_PER_MESSAGE = 100_000


@dataclass
class Stats:
    """Counters a user (and the tests) can read: `Emitter.stats`."""

    points_logged: int = 0
    events_sent: int = 0
    events_spooled: int = 0
    points_dropped: int = 0
    events_dropped: int = 0
    send_errors: int = 0
    background_errors: int = 0
    dropped_by_run: dict[str, int] = field(default_factory=dict)


class _Barrier:
    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = threading.Event()


class Emitter:
    """Owns the hot buffers, the background thread, the producer and the spool."""

    def __init__(self, settings: Settings, *, offline: bool = False):
        self.settings = settings
        self.offline = offline
        # --- hot path state (appended to by any thread, swapped by the background thread)
        self.buf: list[tuple] = []          # (gidx, step, ts_seconds, float value)
        self.sbuf: list[tuple] = []         # (gidx, step, ts_seconds, str value)
        self.chunks: list[tuple] = []       # (gidx, step, ts_seconds, value) numpy arrays
        self.chunk_points = 0
        self.control: collections.deque = collections.deque()  # (run_id, experiment, payload)
        self.batch_max = settings.batch_max_points
        self.buffer_max = settings.buffer_max_points
        # --- name table: gidx -> (run_id, experiment, MetricName)
        self.names: list[tuple[str, str, MetricName]] = []
        self._run_of: list[int] = []        # gidx -> run index, kept at registration
        self._run_index: dict[str, int] = {}
        self._name_lock = threading.Lock()
        self._topics_ready = False
        self.stats = Stats()
        self._warned_drop = False
        self._open_runs: dict[str, str] = {}  # run_id -> experiment, for heartbeats
        #: (run_id, topic) -> the next seq: a source numbers its events per run and topic from 0, so what is
        #: missing of them can be told (runwatch/core/seqs.py)
        self._seqs: dict[tuple[str, str], itertools.count] = {}
        self._woken_for: list | None = None
        self._retired: list[tuple[int, list, int]] = []  # (kind, swapped list, cycles left)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_async: asyncio.Event | None = None
        self._started = threading.Event()
        self._closing = False
        self._final_drain_tried = False
        self._closed = False
        self._start_lock = threading.Lock()
        self.connected = False
        self._spool: Spool | None = None
        self._held: collections.deque[Record] = collections.deque()  # control events the spool refused
        self._held_bytes = 0

    # ------------------------------------------------------------------ hot-path helpers
    def register(self, run_id: str, experiment: str, name: MetricName) -> int:
        with self._name_lock:
            self._run_of.append(self._run_index.setdefault(run_id, len(self._run_index)))
            self.names.append((run_id, experiment, name))
            return len(self.names) - 1

    def full(self) -> None:
        """Called by log() when the hot buffer reached `batch_max`: wake the thread, or drop."""
        self.ensure_started()
        buf = self.buf
        if len(buf) > self.buffer_max:
            # the background thread cannot keep up: drop the newest points, count them, warn once
            extra = len(buf) - self.buffer_max
            for _ in range(extra):
                try:
                    point = buf.pop()
                except IndexError:
                    break
                self.count_drop(self.names[int(point[0])][0], 1)
        if self._woken_for is not buf:  # once per buffer: every log() after the mark would otherwise write
            self._woken_for = buf       # to the loop's self-pipe (a system call) until the thread swaps it
            self.wake()

    def add_chunk(self, chunk: tuple) -> None:
        """A whole column of points (log_list, log_table); wakes the thread once a batch's worth is waiting."""
        self.chunks.append(chunk)
        self.chunk_points += len(chunk[0])
        if self.chunk_points >= self.batch_max:
            self.ensure_started()
            self.wake()

    def count_drop(self, run_id: str, n: int) -> None:
        """Count points that could not be kept (reported on the run as dropped_points); warn once."""
        self.stats.points_dropped += n
        self.stats.dropped_by_run[run_id] = self.stats.dropped_by_run.get(run_id, 0) + n
        if not self._warned_drop:
            self._warned_drop = True
            log.warning("runwatch: dropping metric points (buffer or spool full); the count is reported on the run")

    def wake(self) -> None:
        loop, ev = self._loop, self._wake_async
        if loop is not None and ev is not None:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # loop closed
                pass

    def send_control(self, run_id: str, experiment: str, payload: Any) -> None:
        if self._closed:
            raise RuntimeError("runwatch: this process's emitter is closed")
        self.control.append((run_id, experiment, payload))
        self.ensure_started()
        self.wake()

    def open_run(self, run_id: str, experiment: str) -> None:
        self._open_runs[run_id] = experiment

    def close_run(self, run_id: str) -> None:
        self._open_runs.pop(run_id, None)

    # ------------------------------------------------------------------ lifecycle
    def ensure_started(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._thread_main, name="runwatch-emitter", daemon=True)
            self._thread.start()
            self._started.wait(5)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Block until every point logged before this call is acknowledged by the broker or in the spool."""
        if self._closed:
            return True
        self.ensure_started()
        barrier = _Barrier()
        loop = self._loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(self._request_flush, barrier)
        except RuntimeError:
            return False
        return barrier.event.wait(timeout)

    def close(self, timeout: float = 10.0) -> bool:
        """Stop accepting, drain (to the broker or the spool), stop the thread."""
        if self._closed or self._thread is None:
            self._closed = True
            return True
        ok = self.flush(timeout)
        self._closing = True
        self.wake()
        self._thread.join(timeout)
        self._closed = True
        return ok

    # ------------------------------------------------------------------ background thread
    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._wake_async = asyncio.Event()
        self._flush_requests: list[_Barrier] = []
        self._outbox: collections.deque = collections.deque()
        self._outbox_bytes = 0
        self._spooling = False
        self._producer = None
        self._next_connect = 0.0
        self._connect_failures = 0
        self._started.set()
        try:
            loop.run_until_complete(self._main())
        except Exception:  # never let the thread die silently
            log.exception("runwatch: emitter thread failed")
            self.stats.background_errors += 1
        finally:
            try:
                loop.run_until_complete(self._stop_producer())
            except Exception:
                pass
            loop.close()

    def _request_flush(self, barrier: _Barrier) -> None:
        self._flush_requests.append(barrier)
        self._wake_async.set()

    async def _main(self) -> None:
        last_heartbeat = 0.0
        interval = self.settings.flush_interval
        while True:
            try:
                await asyncio.wait_for(self._wake_async.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self._wake_async.clear()
            try:
                now = time.time()
                if now - last_heartbeat >= self.settings.heartbeat_interval and self._open_runs:
                    last_heartbeat = now
                    for run_id, exp in list(self._open_runs.items()):
                        self.control.append((run_id, exp, Heartbeat(dropped=self.stats.dropped_by_run.get(run_id, 0))))
                barriers, self._flush_requests = self._flush_requests, []
                self._pack()
                for b in barriers:
                    self._enqueue(b)
                await self._send()
            except Exception:
                self.stats.background_errors += 1
                log.exception("runwatch: error in the background flush (training is not affected)")
            if self._closing and not self._outbox and not self._flush_requests:
                if self._spooling and not self.offline and not self._final_drain_tried:
                    # the process is ending with events on disk: one last try to send them now (the broker
                    # may be back), instead of leaving them for `runwatch sync`; bounded by close()'s timeout
                    self._final_drain_tried = True
                    self._next_connect = 0.0
                    try:
                        await self._send()
                    except Exception:
                        log.warning("runwatch: the spool could not be sent at exit; `runwatch sync` sends it")
                return

    # -- packing -------------------------------------------------------------------
    def _take(self) -> tuple[list, list, list]:
        swapped = (self.buf, self.sbuf, self.chunks)
        self.buf, self.sbuf, self.chunks = [], [], []
        self.chunk_points = 0
        # A thread that loaded a list just before the swap appends to it a moment later: empty each
        # swapped list of what it holds now (`del lst[:n]` is atomic under the GIL; a late append lands
        # after it), and look at it for two more cycles for what came late. Emptied at once, a swapped
        # list no longer keeps its points alive: memory stays within `buffer_max_points`.
        late: list[list] = [[], [], []]
        keep = []
        for kind, lst, left in self._retired:
            n = len(lst)
            if n:
                late[kind].extend(lst[:n])
                del lst[:n]
            if left > 0:
                keep.append((kind, lst, left - 1))
        taken = []
        for kind, lst in enumerate(swapped):
            n = len(lst)
            taken.append(late[kind] + lst[:n] if late[kind] else lst[:n])
            del lst[:n]
            keep.append((kind, lst, 2))
        self._retired = keep
        return taken[0], taken[1], taken[2]

    def _pack(self) -> None:
        numeric, text, chunks = self._take()
        while self.control:
            run_id, exp, payload = self.control.popleft()
            self._enqueue_event(run_id, exp, payload, "runs" if payload.kind not in ("logs",) else "logs")
        if not numeric and not text and not chunks:
            return
        n = len(numeric)
        self.stats.points_logged += n + len(text) + sum(len(c[0]) for c in chunks)
        if n:
            flat = np.fromiter(itertools.chain.from_iterable(numeric), dtype=np.float64, count=4 * n).reshape(n, 4)
            parts = [(flat[:, 0].astype(np.uint32), flat[:, 1].astype(np.int64), flat[:, 2], flat[:, 3])]
        else:
            parts = []
        parts.extend(chunks)
        if parts:
            gidx = np.concatenate([p[0] for p in parts]).astype(np.uint32)
            step = np.concatenate([p[1] for p in parts]).astype(np.int64)
            ts = (np.concatenate([p[2] for p in parts]) * 1e6).astype(np.int64)
            val = np.concatenate([p[3] for p in parts]).astype(np.float64)
        else:
            gidx = np.empty(0, np.uint32)
            step = ts = np.empty(0, np.int64)
            val = np.empty(0)
        if text:
            s_gidx = np.fromiter((p[0] for p in text), dtype=np.uint32, count=len(text))
            s_step = np.fromiter((p[1] for p in text), dtype=np.int64, count=len(text))
            s_ts = (np.fromiter((p[2] for p in text), dtype=np.float64, count=len(text)) * 1e6).astype(np.int64)
            s_val = [p[3] for p in text]
        else:
            s_gidx = np.empty(0, np.uint32)
            s_step = s_ts = np.empty(0, np.int64)
            s_val = []
        names = self.names
        run_of = np.array(self._run_of, dtype=np.int32)
        for _, sel, s_sel in _group(run_of[gidx], run_of[s_gidx] if len(s_gidx) else np.empty(0, np.int32)):
            run_id, exp, _ = names[int(gidx[sel][0] if len(sel) else s_gidx[s_sel][0])]
            g, sg = gidx[sel], s_gidx[s_sel]
            uniq, inv = np.unique(np.concatenate([g, sg]), return_inverse=True)
            table = [names[int(i)][2] for i in uniq]
            inv_n, inv_s = inv[: len(g)], inv[len(g):]
            st, tt, vv = step[sel], ts[sel], val[sel]
            s_st, s_tt = s_step[s_sel], s_ts[s_sel]
            s_vv = [s_val[int(i)] for i in s_sel]
            total = len(g)
            for lo in range(0, max(total, 1), MAX_POINTS_PER_MESSAGE):
                hi = lo + MAX_POINTS_PER_MESSAGE
                first = lo == 0
                batch = MetricBatch.from_arrays(
                    table, inv_n[lo:hi], st[lo:hi], tt[lo:hi], vv[lo:hi],
                    inv_s if first else None, s_st if first else None, s_tt if first else None,
                    s_vv if first else None)
                self._enqueue_event(run_id, exp, batch, "metrics", points=min(hi, total) - lo + (len(s_vv) if first else 0))

    def _enqueue_event(self, run_id: str, experiment: str, payload: Any, topic: str, points: int = 0) -> None:
        counter = self._seqs.get((run_id, topic))
        if counter is None:
            counter = self._seqs[(run_id, topic)] = itertools.count()
        env: Envelope = make_envelope(run_id, experiment, payload, next(counter))
        rec = Record(self.settings.topic(topic), run_id.encode(), encode(env), run_id, points)
        self._enqueue(rec)

    def _enqueue(self, item: Record | _Barrier) -> None:
        if self._spooling or self.offline:
            if isinstance(item, _Barrier):
                item.event.set()
                return
            self._to_spool([item])
            return
        self._outbox.append(item)
        if isinstance(item, Record):
            self._outbox_bytes += len(item.value)
            if self._outbox_bytes > 64 << 20:  # the broker is slow: move the backlog to disk
                self._start_spooling()

    # -- spooling ------------------------------------------------------------------
    def _get_spool(self) -> Spool:
        if self._spool is None:
            self._spool = Spool(spool_dir_for(self.settings.home, this_source().key), self.settings.spool_max_bytes)
        return self._spool

    def _to_spool(self, records: list[Record]) -> None:
        runs = self.settings.topic("runs")
        if self._held:  # control events are held already: later ones queue behind them, in order
            data = [r for r in records if r.topic != runs]
            refused = (self._get_spool().append(data) if data else []) + [r for r in records if r.topic == runs]
        else:
            refused = self._get_spool().append(records)
        self.stats.events_spooled += len(records) - len(refused)
        for rec in refused:
            if rec.topic == runs and self._held_bytes + len(rec.value) <= HELD_MAX_BYTES:
                # a control event (status, tags, the drop count) the disk would not take: kept in memory,
                # sent after the spool, so that the run's end and what it lost still reach the stack
                self._held.append(rec)
                self._held_bytes += len(rec.value)
                continue
            self.stats.events_dropped += 1
            self.count_drop(rec.run_id, rec.points)

    def _start_spooling(self, failed: list[Record] = ()) -> None:
        """From now on every event goes to the spool, in order, until the spool is drained."""
        self._spooling = True
        pending = list(failed)
        barriers = []
        while self._outbox:
            item = self._outbox.popleft()
            if isinstance(item, _Barrier):
                barriers.append(item)
            else:
                pending.append(item)
        self._outbox_bytes = 0
        self._to_spool(pending)
        for b in barriers:
            b.event.set()

    # -- sending -------------------------------------------------------------------
    async def _send(self) -> None:
        if self.offline:
            return
        if self._producer is None and not await self._connect():
            if self._outbox:
                self._start_spooling()
            return
        if self._spooling:
            if not await self._drain_spool():
                return
        if self._held:
            held = list(self._held)
            failed = await self._send_records(held)
            if failed:
                await self._disconnect()
                self._spooling = True  # the outbox waits behind what is held
                return
            self._held.clear()
            self._held_bytes = 0
        while self._outbox:
            items = []
            while self._outbox:
                items.append(self._outbox.popleft())
            self._outbox_bytes = 0
            records = [i for i in items if isinstance(i, Record)]
            failed = await self._send_records(records)
            if failed:
                self._start_spooling(failed)
                # the barriers in `items` are satisfied: their events are in the spool
                for i in items:
                    if isinstance(i, _Barrier):
                        i.event.set()
                await self._disconnect()
                return
            for i in items:
                if isinstance(i, _Barrier):
                    i.event.set()

    async def _send_records(self, records: list[Record]) -> list[Record]:
        """Send in order; return the records not acknowledged (all of them after the first failure)."""
        if not records:
            return []
        futures = []
        try:
            for rec in records:
                futures.append(await self._producer.send(rec.topic, rec.value, key=rec.key))
        except Exception as exc:
            self.stats.send_errors += 1
            log.warning("runwatch: broker send failed (%s); spooling", exc)
            return records[len(futures):] if not futures else await self._settle(records, futures, len(futures))
        return await self._settle(records, futures, len(records))

    async def _settle(self, records, futures, n_sent) -> list[Record]:
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed_at = None
        for i, res in enumerate(results):
            if isinstance(res, Exception):
                failed_at = i
                self.stats.send_errors += 1
                log.warning("runwatch: broker did not acknowledge an event (%s); spooling", res)
                break
        if failed_at is None:
            self.stats.events_sent += n_sent
            return records[n_sent:]
        self.stats.events_sent += failed_at
        return records[failed_at:]

    async def _drain_spool(self) -> bool:
        spool = self._get_spool()
        while True:
            batch, cursor = spool.peek(500)
            if not batch:  # drained (a torn tail record from a crash is unreadable and skipped)
                self._spooling = False
                return True
            failed = await self._send_records(batch)
            if failed:
                await self._disconnect()
                return False
            spool.consume(cursor)

    async def _connect(self) -> bool:
        now = time.monotonic()
        if now < self._next_connect:
            return False
        bootstrap = self.settings.resolved_bootstrap()
        if not bootstrap:
            self._backoff()
            return False
        producer = kafka.producer(self.settings, bootstrap, client_id=f"runwatch-sdk-{os.getpid()}")
        try:
            await asyncio.wait_for(producer.start(), self.settings.request_timeout_ms / 1000)
            if not self._topics_ready:  # once per process, not on every reconnect
                await kafka.ensure_topics(self.settings, bootstrap)
                self._topics_ready = True
        except Exception as exc:
            try:
                await producer.stop()
            except Exception:
                pass
            if self._connect_failures == 0:
                log.warning("runwatch: no broker at %s (%s); events go to the spool until it answers", bootstrap, exc)
            self._backoff()
            return False
        self._producer = producer
        self._connect_failures = 0
        self.connected = True
        return True

    def _backoff(self) -> None:
        self._connect_failures += 1
        self._next_connect = time.monotonic() + min(0.5 * 2 ** min(self._connect_failures, 4), 5.0)

    async def _disconnect(self) -> None:
        self.connected = False
        self._backoff()
        await self._stop_producer()

    async def _stop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), 5)
            except Exception:
                pass
        if self._spool is not None and self._closing:
            self._spool.close()


def _group(run_n: np.ndarray, run_s: np.ndarray):
    """Yield (run index, numeric positions, string positions) for every run present."""
    runs = np.union1d(np.unique(run_n), np.unique(run_s))
    if len(runs) == 1:
        r = int(runs[0])
        yield r, np.arange(len(run_n)), np.arange(len(run_s))
        return
    order_n = np.argsort(run_n, kind="stable")
    order_s = np.argsort(run_s, kind="stable")
    sn, ss = run_n[order_n], run_s[order_s]
    for r in runs:
        a, b = np.searchsorted(sn, r), np.searchsorted(sn, r, side="right")
        c, d = np.searchsorted(ss, r), np.searchsorted(ss, r, side="right")
        yield int(r), order_n[a:b], order_s[c:d]


# --------------------------------------------------------------------- per-process singleton
_EMITTERS: dict[tuple, Emitter] = {}
_EMITTER_LOCK = threading.Lock()
#: What to call in a forked child: bound methods of live objects (weakly held: a run that is gone is skipped).
_ON_FORK: list[weakref.WeakMethod] = []


def get_emitter(settings: Settings, *, offline: bool = False) -> Emitter:
    key = (settings, offline)
    em = _EMITTERS.get(key)
    if em is None:
        with _EMITTER_LOCK:
            em = _EMITTERS.get(key)
            if em is None:
                em = _EMITTERS[key] = Emitter(settings, offline=offline)
    return em


def on_fork(callback) -> None:
    """Call `callback` (a bound method) in a forked child, unless its object is gone by then."""
    _ON_FORK[:] = [ref for ref in _ON_FORK if ref() is not None]
    _ON_FORK.append(weakref.WeakMethod(callback))


def close_all(timeout: float = 10.0) -> None:
    emitters = list(_EMITTERS.values())
    _EMITTERS.clear()
    for em in emitters:
        try:
            em.close(timeout)
        except Exception:
            log.exception("runwatch: closing the emitter failed")


def _after_fork_in_child() -> None:
    # The parent's thread does not exist here and its buffers are the parent's to send:
    # start over with empty emitters; live runs drop their cached name indices.
    global _EMITTER_LOCK
    _EMITTERS.clear()
    _EMITTER_LOCK = threading.Lock()
    for ref in list(_ON_FORK):
        callback = ref()
        if callback is not None:
            try:
                callback()
            except Exception:
                log.exception("runwatch: resetting after fork failed")


atexit.register(close_all)
os.register_at_fork(after_in_child=_after_fork_in_child)

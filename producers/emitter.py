"""The background batching producer: one daemon thread per process owns an asyncio loop and the Kafka producer.

`Run.log()` appends a point to the one hot buffer (producers/buffer.py) and returns; this thread takes
the buffer every `flush_interval` (or when `batch_max_points` are waiting), turns it into per-run columnar
MetricBatch events, and hands them to a sender that keeps sending while the next ones are packed. What
cannot be sent yet waits in memory (`outbox_max_bytes`), then in the spool on disk; only a full spool
drops, and what it drops is counted and reported on the run.

On the embedded broker, which keeps everything in memory, every event sent is also kept on disk until
the read API says the store has it (producers/retain.py): after the broker's restart, what it lost is
sent again. A source numbers its events per run and topic from 0 (runwatch/core/seqs.py).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runwatch.core import kafka
from runwatch.core.events import (
    Heartbeat,
    MetricBatch,
    MetricName,
    PropertiesSet,
    TagsSet,
    encode,
    make_envelope,
    this_source,
)
from runwatch.core.retry import Backoff
from runwatch.core.settings import Settings

from .buffer import Buffer, Columns
from .retain import Retention, retention_dir
from .spool import Record, Spool, spool_dir_for

log = logging.getLogger("runwatch.producer")


def _quiet_client_logs() -> None:
    """aiokafka logs every failed connection while the broker is away (hundreds of lines during a `runwatch
    down`/`up`), on the training's terminal and, captured, in the run's logs; the emitter says itself when it
    spools and sends again. Quieted unless the user set its level (logging.getLogger("aiokafka").setLevel)."""
    client = logging.getLogger("aiokafka")
    if client.level == logging.NOTSET:
        client.setLevel(logging.CRITICAL)

#: Bytes of control events kept in memory when the spool's disk refuses them (status, tags, drop counts).
HELD_MAX_BYTES = 1 << 20
#: Points per metric-batch message: 100 k points are about 2.8 MB before compression.
MAX_POINTS_PER_MESSAGE = 100_000
#: Points packed at once before the loop lets the sender (and the network) run.
PACK_STEP = 500_000
#: Bytes sent before their acknowledgements are awaited.
SEND_GROUP_BYTES = 16 << 20
#: The header in which a read names this process's last writes it must see (runwatch/api/server.py).
AFTER_HEADER = "X-Runwatch-After"
#: Seconds without an acknowledgement after which the broker's identity is asked again before sending.
IDLE_RECHECK = 2.0
#: Seconds after which an event the store has not confirmed, though it caught up, is sent again (the
#: processors may skip an event after a crash: docs/architecture.md, Dependencies).
RESEND_AFTER = 20.0


@dataclass
class Stats:
    """Counters a user (and the tests) can read: `Run.emitter.stats`."""

    points_logged: int = 0
    events_sent: int = 0
    events_spooled: int = 0
    points_dropped: int = 0
    events_dropped: int = 0
    send_errors: int = 0
    background_errors: int = 0
    #: events sent again after the embedded broker restarted (or the store missed them)
    events_resent: int = 0
    #: events kept until the store confirmed them, and those let go before (the bound `retain_max_bytes`)
    events_confirmed: int = 0
    events_unconfirmed_released: int = 0
    #: times the logging thread turned its hot points into columns itself (the background thread was behind)
    compactions: int = 0
    compact_seconds: float = 0.0
    dropped_by_run: dict[str, int] = field(default_factory=dict)


class _Barrier:
    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = threading.Event()


class Emitter:
    """Owns the hot buffer, the background thread, the producer, the spool and (embedded) the retention."""

    def __init__(self, settings: Settings, *, offline: bool = False):
        self.settings = settings
        self.offline = offline
        self.buffer = Buffer(settings.batch_max_points, settings.buffer_max_points, settings.buffer_max_bytes,
                             self._dropped)
        self.control: collections.deque = collections.deque()  # (run_id, experiment, payload)
        # --- name table: gidx -> (run_id, experiment, MetricName)
        self.names: list[tuple[str, str, MetricName]] = []
        self._run_of: list[int] = []        # gidx -> run index, kept at registration
        self._run_index: dict[str, int] = {}
        self._name_lock = threading.Lock()
        self._topics_ready = False
        self.stats = Stats()
        self._warned_drop = False
        self._open_runs: dict[str, str] = {}  # run_id -> experiment, for heartbeats
        #: (run_id, topic) -> the next seq
        self._seqs: dict[tuple[str, str], int] = {}
        #: run_id -> the seq of its last `runs` event that changes its record (not a heartbeat)
        self._state_seqs: dict[str, int] = {}
        self._woken_for: list | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_async: asyncio.Event | None = None
        self._started = threading.Event()
        self._closing = False
        self._final_drain_tried = False
        self._closed = False
        self._start_lock = threading.Lock()
        self.connected = False
        #: the cluster id of the broker connected to (for the embedded broker: its stack's id)
        self.incarnation = ""
        self._spool: Spool | None = None
        self._held: collections.deque[Record] = collections.deque()  # control events the spool refused
        self._held_bytes = 0
        self._retention: Retention | None = None
        self._retain = not offline and settings.resolved_broker_kind() == "tansu" and settings.retain_max_bytes > 0
        self._warned_identity = False
        self._confirmable = False
        self._api = None
        self._saved_switch: float | None = None
        #: the read API answered the last question about what is stored
        self._api_answers = False

    # ------------------------------------------------------------------ what runs call
    def register(self, run_id: str, experiment: str, name: MetricName) -> int:
        with self._name_lock:
            self._run_of.append(self._run_index.setdefault(run_id, len(self._run_index)))
            self.names.append((run_id, experiment, name))
            return len(self.names) - 1

    def full(self) -> None:
        """log() found the hot buffer at `batch_max` points: wake the thread (once per list); the buffer
        compacts itself if the thread is behind."""
        self.ensure_started()
        buf = self.buffer
        num = buf.num
        if len(num) >= buf.hot_max:  # the thread is behind: columns, and the memory bound
            buf.full()
        elif self._woken_for is not num:  # once per list: every log() after the mark would otherwise write
            self._woken_for = num         # to the loop's self-pipe (a system call) until the thread swaps it
            buf.mark = buf.hot_max        # and call this again only when the list reaches the next mark
            self._boost()
            self.wake()

    def _boost(self) -> None:
        """The training thread logs faster than a flush carries: let the background thread have the GIL back
        soon after it waited (the interpreter's default 5 ms let a logging loop keep it while events piled up
        in memory; docs/performance.md). Undone once a flush finds the buffer small again."""
        boost = self.settings.boost_switch_interval
        if boost > 0 and self._saved_switch is None and sys.getswitchinterval() > boost:
            self._saved_switch = sys.getswitchinterval()
            sys.setswitchinterval(boost)

    def _unboost(self) -> None:
        if self._saved_switch is not None and sys.getswitchinterval() == self.settings.boost_switch_interval:
            sys.setswitchinterval(self._saved_switch)
        self._saved_switch = None

    def added(self, wake: bool) -> None:
        """A slower path added points (strings, rows, columns): start the thread, and wake it if asked."""
        self.ensure_started()
        if wake:
            self.wake()

    def _dropped(self, gidx: int, n: int) -> None:
        self.count_drop(self.names[int(gidx)][0], n)

    def count_drop(self, run_id: str, n: int) -> None:
        """Count points that could not be kept (reported on the run as dropped_points); warn once."""
        self.stats.points_dropped += n
        self.stats.dropped_by_run[run_id] = self.stats.dropped_by_run.get(run_id, 0) + n
        if not self._warned_drop:
            self._warned_drop = True
            log.warning("runwatch: dropping metric points (the buffer or the spool is full); the count is reported "
                        "on the run")

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

    def last_seq(self, run_id: str, topic: str) -> int:
        """The seq of the last event of this run on `topic` handed to the sender (-1: none)."""
        return self._seqs.get((run_id, topic), 0) - 1

    def metrics_token(self, run_ids: list[str]) -> dict[str, str]:
        """Headers that make the read API answer once every metric point this process logged so far for these
        runs is stored (read-your-writes: producers/local.py). Empty when it logged none."""
        import json

        if not any(self.last_seq(r, "metrics") >= 0 for r in run_ids) and not self.buffer.points:
            return {}
        self.flush(10)  # what is buffered is numbered and sent first
        wanted = {r: s for r in run_ids if (s := self.last_seq(r, "metrics")) >= 0}
        return {AFTER_HEADER: json.dumps({"src": this_source().key, "metrics": wanted})} if wanted else {}

    def last_state_seq(self, run_id: str) -> int:
        """The seq of the last event that changes the run's record (status, tags, properties...; -1: none)."""
        return self._state_seqs.get(run_id, -1)

    @property
    def spooling(self) -> bool:
        return bool(getattr(self, "_spooling", False))

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
        _quiet_client_logs()
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._wake_async = asyncio.Event()
        self._send_wake = asyncio.Event()
        self._flush_requests: list[_Barrier] = []
        self._outbox: collections.deque = collections.deque()
        self._outbox_bytes = 0
        self._spooling = False
        self._producer = None
        self._next_connect = 0.0
        self._connects = Backoff(first=1.0, most=5.0)
        self._next_confirm = 0.0
        self._sending = False
        #: events to send again before anything else (the embedded broker restarted: it never had them)
        self._resend: collections.deque[Record] = collections.deque()
        self._last_ack = time.monotonic()
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
            if self._retention is not None:
                self._retention.close()
            loop.close()

    def _request_flush(self, barrier: _Barrier) -> None:
        self._flush_requests.append(barrier)
        self._wake_async.set()

    async def _main(self) -> None:
        sender = asyncio.ensure_future(self._sender())
        try:
            await self._loop_forever()
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    async def _loop_forever(self) -> None:
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
                await self._pack()
                for b in barriers:
                    self._enqueue(b)
                self._send_wake.set()
                if self._retention is not None and time.monotonic() >= self._next_confirm and len(self._retention):
                    self._next_confirm = time.monotonic() + self.settings.confirm_interval
                    await self._confirm()
            except Exception:
                self.stats.background_errors += 1
                log.exception("runwatch: error in the background flush (training is not affected)")
            if self._closing and not self._outbox and not self._flush_requests and not self._sending:
                await self._at_close()
                return

    async def _at_close(self) -> None:
        if self._spooling and not self.offline and not self._final_drain_tried:
            # the process is ending with events on disk: one last try to send them now (the broker may be
            # back), instead of leaving them for the worker or `runwatch sync`; bounded by close()'s timeout
            self._final_drain_tried = True
            self._next_connect = 0.0
            try:
                await self._send()
            except Exception:
                log.warning("runwatch: the spool could not be sent at exit; the stack sends it when it is up")
        if self._retention is not None and len(self._retention):
            # a moment for the store to confirm the last events; what it has not confirmed stays on disk as a
            # spool, which the worker sends again (the stages drop what was stored)
            deadline = time.monotonic() + self.settings.close_confirm_timeout
            await self._confirm()
            while len(self._retention) and self._api_answers and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                await self._confirm()

    # -- packing -------------------------------------------------------------------
    async def _pack(self) -> None:
        control = self.control
        while control:
            run_id, exp, payload = control.popleft()
            if isinstance(payload, (TagsSet, PropertiesSet)):
                # one run's tags (or properties) set call after call travel as one event
                field_name = "tags" if isinstance(payload, TagsSet) else "properties"
                merged = None
                removed: set[str] = set(getattr(payload, "removed", ()) or ())
                while control and control[0][0] == run_id and type(control[0][2]) is type(payload):
                    if merged is None:
                        merged = dict(getattr(payload, field_name))
                    nxt_payload = control.popleft()[2]
                    nxt = getattr(nxt_payload, field_name)
                    if field_name == "tags":
                        # in call order: a removal drops what was set before it; a set after a removal wins
                        merged.update(nxt)
                        removed -= set(nxt)
                        for k in nxt_payload.removed:
                            merged.pop(k, None)
                            removed.add(k)
                    else:
                        merged.update({k: v for k, v in nxt.items() if k not in merged})
                if merged is not None:
                    payload = (TagsSet(tags=merged, removed=sorted(removed)) if field_name == "tags"
                               else type(payload)(**{field_name: merged}))
            topic = "logs" if payload.kind == "logs" else "runs"
            self._enqueue_event(run_id, exp, payload, topic, retain=not isinstance(payload, Heartbeat))
        chunks = self.buffer.take()
        st = self.stats
        st.compactions, st.compact_seconds = self.buffer.compactions, self.buffer.compact_seconds
        taken = sum(len(c) for c in chunks)
        if self._saved_switch is not None and taken < self.buffer.batch_max and not self._spooling \
                and self._outbox_bytes < SEND_GROUP_BYTES:
            self._unboost()
        if not chunks:
            return
        # a few chunks at a time, so that the sender (and the network) run between them
        group: list[Columns] = []
        size = 0
        for c in chunks:
            group.append(c)
            size += len(c)
            if size >= PACK_STEP:
                self._pack_columns(group)
                group, size = [], 0
                await asyncio.sleep(0)
        if group:
            self._pack_columns(group)

    def _pack_columns(self, chunks: list[Columns]) -> None:
        nums = [c for c in chunks if c.texts is None]
        texts = [c for c in chunks if c.texts is not None]
        self.stats.points_logged += sum(len(c) for c in chunks)

        def cat(parts, attr, dtype):
            return np.concatenate([getattr(p, attr) for p in parts]).astype(dtype, copy=False) if parts else \
                np.empty(0, dtype)

        gidx, step, ts, val = (cat(nums, "gidx", np.uint32), cat(nums, "step", np.int64), cat(nums, "ts", np.int64),
                               cat(nums, "value", np.float64))
        s_gidx, s_step, s_ts = cat(texts, "gidx", np.uint32), cat(texts, "step", np.int64), cat(texts, "ts", np.int64)
        s_val = [t for c in texts for t in c.texts]
        names = self.names
        with self._name_lock:
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
                self._enqueue_event(run_id, exp, batch, "metrics",
                                    points=min(hi, total) - lo + (len(s_vv) if first else 0))

    def _enqueue_event(self, run_id: str, experiment: str, payload: Any, topic: str, points: int = 0,
                       retain: bool = True) -> None:
        seq = self._seqs.get((run_id, topic), 0)
        self._seqs[(run_id, topic)] = seq + 1
        if topic == "runs" and retain:
            self._state_seqs[run_id] = seq
        env = make_envelope(run_id, experiment, payload, seq)
        self._enqueue(Record(self.settings.topic(topic), run_id.encode(), encode(env), run_id, points, seq, retain))

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
            if self._outbox_bytes > self.settings.outbox_max_bytes:  # the broker is slow: the backlog to disk
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
    async def _sender(self) -> None:
        """Sends what the packer puts in the outbox, while the packer goes on."""
        while True:
            await self._send_wake.wait()
            self._send_wake.clear()
            self._sending = True
            try:
                await self._send()
            except Exception:
                self.stats.background_errors += 1
                log.exception("runwatch: error sending (training is not affected)")
            finally:
                self._sending = False
                if self._closing or self._flush_requests:
                    self._wake_async.set()  # the packer looks at what is left

    async def _send(self) -> None:
        if self.offline:
            return
        if self._producer is None and not await self._connect():
            if self._outbox:
                self._start_spooling()
            return
        if self._retention is not None and time.monotonic() - self._last_ack > IDLE_RECHECK:
            # idle for a while: the broker may have restarted meanwhile, and the connection moved on to the new
            # one without a word (aiokafka reconnects by itself); what it lost goes first
            await self._recheck_incarnation()
        if self._resend:
            again = list(self._resend)
            failed = await self._send_records(again)
            self._resend = collections.deque(failed)
            if failed:
                await self._disconnect()
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
            items, size = [], 0
            while self._outbox and size < SEND_GROUP_BYTES:
                item = self._outbox.popleft()
                items.append(item)
                if isinstance(item, Record):
                    size += len(item.value)
                    self._outbox_bytes -= len(item.value)
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
        acked = n_sent if failed_at is None else failed_at
        self.stats.events_sent += acked
        if acked:
            self._last_ack = time.monotonic()
        if self._retain and self._confirmable:
            self._keep(records[:acked])
        return records[acked:]

    def _keep(self, records: list[Record]) -> None:
        """Acknowledged by the embedded broker: kept on disk until the store confirms them."""
        if self._retention is None:
            self._retention = Retention(retention_dir(spool_dir_for(self.settings.home, this_source().key)),
                                        self.settings.retain_max_bytes)
        prefix = len(self.settings.topic_prefix)
        for rec in records:
            if rec.retain and rec.seq >= 0:
                self._retention.add(rec, rec.topic[prefix:], rec.seq, self.incarnation)
        self.stats.events_unconfirmed_released = self._retention.released_unconfirmed

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

    # -- the embedded broker: what the store has, what must go again -----------------------
    async def _confirm(self) -> None:
        """Ask the read API what the store has of this process's events; let those go; send again what the
        broker the store reads now never had (it restarted) or what the store missed long after it caught up."""
        ret = self._retention
        runs = ret.runs()
        if not runs:
            return
        from runwatch.core.client import AsyncApi
        from runwatch.core.errors import RunwatchError

        if self._api is None:
            self._api = AsyncApi(self.settings)
        try:
            answer = await self._api.get(f"/api/sources/{this_source().key}/stored", run=runs)
        except (RunwatchError, OSError):
            self._api_answers = False
            return  # the read API away for a moment: ask again later
        self._api_answers = True
        ret.confirm(answer.get("runs") or {})
        self.stats.events_confirmed = ret.confirmed
        theirs = answer.get("incarnation") or ""
        if theirs and theirs != self.incarnation and self._producer is not None:
            # the broker the store reads is not the one acknowledged by: the connection may have moved on
            # to a restarted broker without a word (aiokafka reconnects by itself); ask it
            try:
                self.incarnation = await kafka.cluster_id(self.settings, self.settings.resolved_bootstrap() or "")
            except Exception:
                return
        if theirs != self.incarnation:
            return  # connected to another broker than the store's: sending there would not help
        self._requeue(ret.stale(theirs, RESEND_AFTER if answer.get("caught_up") else None))

    def _requeue(self, ids: list[int]) -> None:
        """Retained events to send again, before anything else, in the order they were first sent."""
        if not ids:
            return
        records = [rec for rec, _, _ in self._retention.take(ids)]
        self.stats.events_resent += len(records)
        log.warning("runwatch: sending again %d event(s) the store does not have (the embedded broker restarted, "
                    "or the store missed them)", len(records))
        self._resend.extend(records)
        self._send_wake.set()

    async def _recheck_incarnation(self) -> None:
        self._last_ack = time.monotonic()
        try:
            now = await kafka.cluster_id(self.settings, self.settings.resolved_bootstrap() or "")
        except Exception:
            return
        if now and now != self.incarnation:
            self.incarnation = now
            self._requeue(self._retention.stale(now))

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
            # every connection asks the broker who it is: a restarted embedded broker is a new lifetime, and a
            # broker found through this home's stack record must be that stack's
            if not self._topics_ready:
                incarnation = await kafka.ensure_topics(self.settings, bootstrap)
                self._topics_ready = True
            else:
                incarnation = await kafka.cluster_id(self.settings, bootstrap)
            expected = None if self.settings.bootstrap_servers else self.settings.stack_record().get("stack_id")
            if expected and incarnation != expected:
                if not self._warned_identity:
                    self._warned_identity = True
                    log.warning("runwatch: the broker at %s belongs to another runwatch stack (%s), not to the one "
                                "recorded under %s; events wait in the spool until that stack is up again",
                                bootstrap, incarnation, self.settings.home)
                raise ConnectionError("another stack's broker")
        except Exception as exc:
            try:
                await producer.stop()
            except Exception:
                pass
            if self._connects.tries == 0 and not self._warned_identity:
                log.warning("runwatch: no broker at %s (%s); events go to the spool until it answers", bootstrap, exc)
            self._backoff()
            return False
        self._producer = producer
        self.incarnation = incarnation
        self._last_ack = time.monotonic()
        if self._retention is not None:
            self._requeue(self._retention.stale(incarnation))  # a new broker lifetime: what the last one lost first
        # kept until confirmed only where a read API can confirm them (the embedded stack's worker)
        self._confirmable = bool(self.settings.resolved_api_url())
        self._connects.reset()
        self.connected = True
        return True

    def _backoff(self) -> None:
        self._next_connect = time.monotonic() + self._connects.next()

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

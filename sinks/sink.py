"""The ClickHouse sink: consumes the topics, writes them through the store in batches, and commits the
offsets only after the store took them.

Idempotence: every write carries deduplication tokens that name its topic range and the broker's
lifetime (its cluster id: a restarted embedded broker numbers its offsets from 0 again, and must never
collide with what an earlier one wrote). Before writing, the store records the range (an *intent*); after
a crash between write and commit the sink finds the intent that starts at the committed offset and
writes exactly that range again with the same tokens, so ClickHouse drops the repeat. Events a producer
sends again (after a lost ack, or resent after a broker restart) are dropped by (source, seq): what of
each source is stored is known (core/seqs.py), seeded from the store after a restart.

Bad data never stalls the stream: an event that cannot be built becomes a dead letter with its reason;
a batch the store keeps refusing while it answers is written event by event, and the event it refuses
becomes a dead letter. Only transient errors (the store away) are retried, for as long as it takes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from runwatch.core import kafka
from runwatch.core.events import (
    Envelope,
    EventError,
    LogBatch,
    MetricBatch,
    RunState,
    decode,
)
from runwatch.core.retry import Backoff
from runwatch.core.seqs import Seen
from runwatch.core.settings import Settings
from runwatch.core.states import TERMINAL

from .repair import AggregatesCheck
from .rows import DataError, RowBuilder
from .store import ClickHouseStore, WriteBatch, is_transient

log = logging.getLogger("runwatch.sink")

SINK_TOPICS = ("metrics", "logs", "aggregates", "alerts", "dlq")
#: Topics whose events are deduplicated by (run, source, seq): the others are idempotent by their keys.
SEQ_TOPICS = ("metrics", "logs")
#: Times a batch is written again as it is after an error that is not transient, before it is written
#: event by event to find the event the store refuses.
SAME_BATCH_TRIES = 3


@dataclass
class SinkStats:
    batches: int = 0
    events: int = 0
    rows: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    repeats_dropped: int = 0
    rejected: int = 0
    dead_letters: int = 0
    #: events of the stream the sink could not store (built badly, or refused by the store), dead-lettered
    data_errors: int = 0
    insert_retries: int = 0
    last_insert_ts: float = 0.0
    lag: dict[str, int] = field(default_factory=dict)


@dataclass
class _Prepared:
    """One chunk of a fetch, decoded and built, waiting for its write."""

    ranges: dict[Any, tuple[int, int, list]]
    batch: WriteBatch
    #: sequence numbers this chunk adds to what is stored: (kind, run, source) -> seqs
    added: dict[tuple[str, str, str], list[int]] = field(default_factory=lambda: defaultdict(list))
    #: the processors' `seen` of the run states in it (for the read API's "what is stored" answer)
    run_seen: dict[str, dict] = field(default_factory=dict)
    events: int = 0
    repeats: int = 0
    rejected: int = 0
    data_errors: int = 0
    finished: list[str] = field(default_factory=list)

    def has(self, key: tuple[str, str, str], seq: int) -> bool:
        return seq in self.added.get(key, ())


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


class Sink:
    """Consumes SINK_TOPICS with manual commits and writes them through `store`.

    `mode` "assign": every partition (the embedded default: no group join, it starts in milliseconds);
    "group": the partitions the consumer group gives this sink (several sinks share them, docs/studio.md).
    """

    def __init__(self, settings: Settings, store: ClickHouseStore, bootstrap: str, group_id: str | None = None,
                 mode: str | None = None):
        self.settings = settings
        self.store = store
        self.bootstrap = bootstrap
        self.group_id = group_id or f"{settings.topic_prefix}sink"
        auto = "group" if settings.worker_role == "sink" else "assign"
        self.mode = mode or (auto if settings.sink_mode == "auto" else settings.sink_mode)
        if self.mode not in ("assign", "group"):
            raise ValueError(f"setting sink_mode: {self.mode!r} is not 'assign' or 'group'")
        self.stats = SinkStats()
        self.checks = AggregatesCheck(store, settings)
        self.consumer = None
        self.ready = False
        self.error: str | None = None
        #: the broker's cluster id, which names its lifetime: part of every intent and token
        self.incarnation = ""
        #: ranges to write again exactly as before, with the same tokens: tp -> (last offset, replay). A replay
        #: (an intent found after a crash) may be stored already; a retry (a chunk that failed here) is checked
        self._forced_end: dict[Any, tuple[int, bool]] = {}
        self._pending: dict[Any, list] = defaultdict(list)
        #: what is stored of each (kind, run, source)
        self.seen = Seen()
        #: the processors' `seen` of each run's stored state: what of the `runs` topic is stored
        self.runs_seen: dict[str, dict] = {}
        #: per partition, the first offset not stored yet (the live tail keeps watched runs' events from there)
        self._stored_next: dict[Any, int] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="runwatch-sink")
        self._build_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="runwatch-sink-build")
        self._topic_kind = {settings.topic(t): t for t in SINK_TOPICS}
        self._next_check = 0.0
        self._rebalanced: list = []

    @property
    def intent_group(self) -> str:
        return f"{self.group_id}@{self.incarnation}"

    # -- starting -----------------------------------------------------------------------------
    async def start(self) -> None:
        self.incarnation = await kafka.cluster_id(self.settings, self.bootstrap)
        self.consumer = kafka.consumer(self.settings, self.bootstrap, client_id=f"{self.group_id}-consumer",
                                       group_id=self.group_id)
        await self.consumer.start()
        topics = [self.settings.topic(t) for t in SINK_TOPICS]
        if self.mode == "group":
            from aiokafka import ConsumerRebalanceListener

            sink = self

            class Listener(ConsumerRebalanceListener):
                async def on_partitions_revoked(self, revoked):
                    sink._drop_partitions(revoked)

                async def on_partitions_assigned(self, assigned):
                    await sink._recover(list(assigned))

            self.consumer.subscribe(topics, listener=Listener())
        else:
            # every topic's partitions, from the cluster's metadata; a topic created a moment ago may not be in
            # it yet (Apache Kafka propagates metadata asynchronously): ask again rather than guess
            deadline = time.monotonic() + 30
            while True:
                parts = await kafka.partitions(self.settings, self.bootstrap, topics)
                if all(parts.values()) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            missing = [t for t, p in parts.items() if not p]
            if missing:
                raise RuntimeError(f"runwatch sink: no partitions known for topic(s) {', '.join(missing)}")
            from aiokafka import TopicPartition

            tps = [TopicPartition(t, p) for t in topics for p in sorted(parts[t])]
            self.consumer.assign(tps)
            await self._recover(tps)
        self.ready = True

    def _drop_partitions(self, tps) -> None:
        for tp in tps:
            self._forced_end.pop(tp, None)
            self._pending.pop(tp, None)
            self._stored_next.pop(tp, None)

    async def _recover(self, tps) -> None:
        """Find intents that start at the committed offsets: those ranges are written again with their tokens."""
        starts = {}
        for tp in tps:
            committed = await self.consumer.committed(tp)
            starts[tp] = committed if committed is not None else 0
            if committed is None:
                await self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)
        if not starts:
            return
        intents = await self._run(lambda: self.store.intents(self.intent_group, [tp.topic for tp in starts],
                                                             list(starts.values())))
        self._stored_next.update(starts)
        for tp, start in starts.items():
            end = intents.get((tp.topic, tp.partition, start))
            if end is not None:
                self._forced_end[tp] = (end, True)
                log.warning("runwatch sink: replaying %s[%d] offsets %d..%d after an unfinished commit",
                            tp.topic, tp.partition, start, end)

    # -- what the rest of the worker asks -----------------------------------------------------------
    def stored_offset(self, tp) -> int:
        """The first offset of `tp` not stored yet (0 before the sink knows)."""
        return self._stored_next.get(tp, 0)

    def metrics_partitions(self) -> list:
        """The `metrics` partitions this sink reads, once it is ready."""
        if not self.ready or self.consumer is None:
            return []
        topic = self.settings.topic("metrics")
        return sorted((tp for tp in self.consumer.assignment() if tp.topic == topic), key=lambda tp: tp.partition)

    def stored(self, src: str, run_ids: list[str]) -> dict[str, dict[str, int]]:
        """For a producer: of each run, the highest seq up to which everything this source sent is stored,
        per topic (-1: nothing). Seeded from the store for runs this sink has not seen since it started."""
        unknown = [r for r in run_ids if ("metrics", r, src) not in self.seen and ("logs", r, src) not in self.seen]
        if unknown:
            self._seed([("metrics", r, src) for r in unknown] + [("logs", r, src) for r in unknown])
        out = {}
        for r in run_ids:
            entry = {}
            for kind in SEQ_TOPICS:
                s = self.seen.sets.get((kind, r, src))
                entry[kind] = s.hi if s is not None else -1
            runs = (self.runs_seen.get(r) or {}).get(src)
            entry["runs"] = (runs[0] if isinstance(runs, list) else int(runs)) if runs is not None else -1
            out[r] = entry
        return out

    def caught_up(self) -> bool:
        return self.ready and not any(self.stats.lag.values())

    async def _run(self, fn):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    # -- the loop -----------------------------------------------------------------------------------
    async def run_forever(self) -> None:
        backoff = Backoff()
        while True:
            try:
                if self.consumer is None:
                    await self.start()
                batch = await self.consumer.getmany(timeout_ms=int(self.settings.sink_max_wait * 1000),
                                                    max_records=self.settings.sink_max_batch_events)
                if batch:
                    await self.process(batch)
                now = time.time()
                if now >= self._next_check and self.checks.pending(now):
                    # at most once a second: runs finishing one after another are checked together, not
                    # each with its own query while the sink is busiest
                    self._next_check = now + 1.0
                    await self._run(self.checks.run_safely)
                await self._update_lag()
                self.error = None
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker away, or a commit refused: start over from the commits
                self.error = f"{type(exc).__name__}: {exc}"
                self.stats.insert_retries += 1
                wait = backoff.next()
                log.warning("runwatch sink: %s; starting again from the committed offsets in %.1fs", self.error, wait)
                await self.stop()
                await asyncio.sleep(wait)

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
        whole: set = set()  # forced ranges: written as they were, never split
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
        # The small topics first: a run's state record (aggregates), its log lines and its alerts go into the
        # first chunk instead of waiting behind every metric chunk of a big fetch (read-your-writes from
        # other processes under load, docs/performance.md).
        metrics_topic = self.settings.topic("metrics")
        ranges = dict(sorted(ranges.items(), key=lambda kv: kv[0].topic == metrics_topic))
        # One fetch can hold millions of points. It is written as chunks of at most sink_max_batch_bytes,
        # each with its own intent and offset commit, and in a pipeline: the next chunk is decoded and built
        # (Python) while this one is written (ClickHouse's threads) -- one big batch at a time left a core
        # idle and made everything in it wait for all of it (docs/performance.md).
        chunks = _chunks(ranges, self.settings.sink_max_batch_bytes, whole)
        loop = asyncio.get_running_loop()
        nxt = loop.run_in_executor(self._build_pool, self.prepare, chunks[0], None, any(tp in replayed for tp in chunks[0]))
        try:
            for i, chunk in enumerate(chunks):
                ready = await nxt
                nxt = (loop.run_in_executor(self._build_pool, self.prepare, chunks[i + 1], ready,
                                            any(tp in replayed for tp in chunks[i + 1]))
                       if i + 1 < len(chunks) else None)
                await self._write(ready)
                await self._commit({tp: end + 1 for tp, (_, end, _) in chunk.items()})
                self.stats.batches += 1
                self.stats.last_insert_ts = time.time()
        finally:
            if nxt is not None:  # a chunk failed: the one built ahead is dropped (the stream starts over)
                await asyncio.gather(nxt, return_exceptions=True)

    async def _commit(self, offsets: dict) -> None:
        await self.consumer.commit(offsets)

    async def _write(self, ready: _Prepared) -> None:
        """Write a prepared chunk until the store has it: transient errors are waited out; an error that is
        not transient is tried again as it is, then the chunk is written event by event."""
        backoff, refusals = Backoff(), 0
        while True:
            try:
                await self._run(lambda: self.store.write(ready.batch))
                break
            except Exception as exc:
                self.stats.insert_retries += 1
                self.error = f"{type(exc).__name__}: {exc}"
                if not is_transient(exc):
                    refusals += 1
                    if refusals >= SAME_BATCH_TRIES and await self._store_answers():
                        log.warning("runwatch sink: the store refused a chunk %d times (%s); writing it event by "
                                    "event", refusals, self.error)
                        ready = await self._run(lambda: self._isolate(ready))
                        continue
                wait = backoff.next()
                log.warning("runwatch sink: %s; writing the chunk again in %.1fs", self.error, wait)
                await asyncio.sleep(wait)
        self.store.done()
        self._stored(ready)

    async def _store_answers(self) -> bool:
        try:
            await self._run(self.store.probe)
            return True
        except Exception:
            return False

    def _stored(self, ready: _Prepared) -> None:
        """A chunk is stored: count it, and remember what of each source is."""
        for key, seqs in ready.added.items():
            for q in seqs:
                self.seen.is_repeat(key, q)
        self.runs_seen.update(ready.run_seen)
        for tp, (_, end, _) in ready.ranges.items():
            self._stored_next[tp] = end + 1
        for token, tables in ready.batch.tables:
            for table, data in tables.items():
                self.stats.rows[table] += data.num_rows
                if table == "dead_letters":
                    self.stats.dead_letters += data.num_rows
        self.stats.events += ready.events
        self.stats.repeats_dropped += ready.repeats
        self.stats.rejected += ready.rejected
        self.stats.data_errors += ready.data_errors
        self.checks.add(ready.finished)

    # -- runs in the sink's threads -----------------------------------------------------------------
    def prepare(self, ranges: dict[Any, tuple[int, int, list]], before: _Prepared | None = None,
                replay: bool = False) -> _Prepared:
        """Decode and build one chunk's tables (the build thread). `before`: the chunk ahead of this one,
        not written yet (its events count as stored for the repeat check)."""
        decoded = {tp: self._decode(tp, msgs) for tp, (_, _, msgs) in ranges.items()}
        self._seed([key for envs in decoded.values() for env, _ in envs if env is not None
                    for key in [self._key(env)] if key is not None])
        intents = [(self.intent_group, tp.topic, tp.partition, start, end) for tp, (start, end, _) in ranges.items()]
        ready = _Prepared(ranges, WriteBatch(intents, replay=replay))
        for tp, (start, end, _) in ranges.items():
            builder = RowBuilder()
            for env, m in decoded[tp]:
                self._take(ready, builder, tp, env, m, before)
            ready.batch.tables.append((f"{self.intent_group}:{tp.topic}:{tp.partition}:{start}:{end}",
                                       builder.tables()))
        return ready

    def _take(self, ready: _Prepared, builder: RowBuilder, tp, env: Envelope | None, m, before) -> None:
        """One message into the chunk: a row, a dead letter, or (a repeat, a rejected batch) nothing."""
        if env is None:
            msg, reason = m
            builder.dead_letter(reason, tp.topic, tp.partition, msg.offset, msg.value or b"", run_id=_key(msg))
            return
        key = self._key(env)
        if key is not None:
            if self.seen.has(key, env.seq) or ready.has(key, env.seq) or (before is not None and before.has(key, env.seq)):
                ready.repeats += 1
                return
        if isinstance(env.payload, MetricBatch) and len(env.payload.names) > self.settings.max_metric_names:
            ready.rejected += 1  # a cardinality bomb: the processors send it to the dlq with the reason
            return
        try:
            builder.add(env)
        except DataError as exc:
            ready.data_errors += 1
            builder.dead_letter(f"the sink could not store it: {exc}", tp.topic, tp.partition, m.offset,
                                m.value or b"", run_id=env.run_id)
            return
        if key is not None:
            ready.added[key].append(env.seq)
        ready.events += 1
        p = env.payload
        if isinstance(p, RunState):
            if isinstance(p.snapshot.get("seen"), dict):
                ready.run_seen[env.run_id] = p.snapshot["seen"]
            if p.snapshot.get("status") in TERMINAL:
                ready.finished.append(env.run_id)

    def _isolate(self, ready: _Prepared) -> _Prepared:
        """The chunk written event by event (the insert thread): what the store refuses while it answers
        becomes a dead letter. What of the chunk is stored already is known from the store itself."""
        keys = list(ready.added)
        for key in keys:
            self.seen.sets.pop(key, None)
        self._seed(keys)
        out = _Prepared(ready.ranges, WriteBatch(ready.batch.intents, replay=True))
        for tp, (start, end, msgs) in ready.ranges.items():
            for env, m in self._decode(tp, msgs):
                offset = m[0].offset if env is None else m.offset
                token = f"{self.intent_group}:{tp.topic}:{tp.partition}:{start}:{end}:{offset}"
                one = _Prepared({tp: (offset, offset, [])}, WriteBatch([]))
                builder = RowBuilder()
                self._take(one, builder, tp, env, m, out)
                one.batch.tables.append((token, builder.tables()))
                while True:
                    try:
                        self.store.write(one.batch)
                        break
                    except Exception as exc:
                        if is_transient(exc) or not self._probe_ok():
                            time.sleep(1.0)  # the store went away meanwhile: this event waits for it
                            continue
                        one = self._refused(tp, env, m, offset, exc, token)
                self.store.done()
                _merge(out, one)
        # written again by the caller as one batch: every insert carries the token it was written with, and
        # ClickHouse drops them as repeats
        return out

    def _refused(self, tp, env, m, offset: int, exc: Exception, token: str) -> _Prepared:
        builder = RowBuilder()
        raw = (m[0].value if env is None else m.value) or b""
        builder.dead_letter(f"the store refused it: {type(exc).__name__}: {exc}"[:2000], tp.topic, tp.partition,
                            offset, raw, run_id=env.run_id if env is not None else _key(m[0]))
        one = _Prepared({tp: (offset, offset, [])}, WriteBatch([]))
        one.data_errors += 1
        one.batch.tables.append((token + ":dlq", builder.tables()))
        log.warning("runwatch sink: %s[%d] offset %d refused by the store (%s): dead-lettered", tp.topic,
                    tp.partition, offset, exc)
        return one

    def _probe_ok(self) -> bool:
        try:
            self.store.probe()
            return True
        except Exception:
            return False

    def _key(self, env: Envelope) -> tuple[str, str, str] | None:
        kind = "metrics" if isinstance(env.payload, MetricBatch) else "logs" if isinstance(env.payload, LogBatch) else None
        return None if kind is None else (kind, env.run_id, env.source.key)

    def _seed(self, keys) -> None:
        """Learn what is stored of the (kind, run, source) streams this sink has not seen since it started."""
        wanted: dict[str, set[str]] = defaultdict(set)
        for kind, run_id, src in keys:
            if (kind, run_id, src) not in self.seen:
                wanted[kind].add(run_id)
        for kind, runs in wanted.items():
            for (run_id, src), seqs in self.store.stored_seqs(kind, sorted(runs)).items():
                self.seen.sets.setdefault((kind, run_id, src), seqs)

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

    async def stop(self) -> None:
        consumer, self.consumer = self.consumer, None
        self.ready = False
        self._forced_end.clear()
        self._pending.clear()
        if consumer is not None:
            try:
                await consumer.stop()
            except Exception:
                pass


def _key(msg) -> str:
    """A message's key, the run id, as text (for a dead letter that could not be decoded)."""
    return (msg.key or b"").decode("utf-8", "replace")[:256]


def _merge(into: _Prepared, one: _Prepared) -> None:
    for key, seqs in one.added.items():
        into.added[key].extend(seqs)
    into.run_seen.update(one.run_seen)
    into.events += one.events
    into.repeats += one.repeats
    into.rejected += one.rejected
    into.data_errors += one.data_errors
    into.finished += one.finished
    into.batch.tables += one.batch.tables


__all__ = ["Sink", "SinkStats", "SINK_TOPICS"]

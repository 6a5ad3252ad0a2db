"""Unit tests of the contract and the pure parts: settings, wire format, state table, aggregates."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from runwatch.core.aggregates import batch_aggregates, merge, metric_key
from runwatch.processors.logic import RunStateLogic
from runwatch.processors.states import TRANSITIONS, check_transition
from runwatch.core.events import (EventError, MetricAggregates, MetricBatch, MetricName, RunCreated, RunStatus, StatusChanged,
                             decode, encode, make_envelope, this_source)
from runwatch.core.settings import Settings


def test_settings_resolve_argument_env_file_default(tmp_path, monkeypatch):
    home = tmp_path / "h"
    home.mkdir()
    (home / "config.toml").write_text("flush_interval = 0.15\npartitions = 3\nlinger_ms = 7\n")
    monkeypatch.setenv("RUNWATCH_HOME", str(home))
    monkeypatch.setenv("RUNWATCH_PARTITIONS", "5")
    s = Settings.load(linger_ms=9)
    assert s.home == home
    assert s.linger_ms == 9            # argument beats everything
    assert s.partitions == 5           # environment beats the file
    assert s.flush_interval == 0.15    # the file beats the default
    assert s.heartbeat_interval == 5.0  # the default


def test_settings_bad_env_value_is_reported_and_default_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RUNWATCH_HOME", str(tmp_path))
    monkeypatch.setenv("RUNWATCH_FLUSH_INTERVAL", "soon")
    s = Settings.load()
    assert s.flush_interval == 0.2  # the default
    assert "RUNWATCH_FLUSH_INTERVAL" in caplog.text and "soon" in caplog.text
    with pytest.raises(ValueError, match="'partitions'"):
        Settings.load(partitions="many")
    with pytest.raises(TypeError, match="unknown runwatch setting"):
        Settings.load(flush_intervall=1)


def _batch(n=5):
    names = [MetricName(name="loss", kind="scalar", dtype="float"), MetricName(name="tag", kind="scalar", dtype="str")]
    return MetricBatch.from_arrays(names, np.zeros(n), np.arange(n), np.arange(n) + 10**15, np.linspace(0, 1, n),
                                   [1], [0], [10**15], ["red"])


def test_wire_round_trip_is_compact():
    env = make_envelope("run-1", "exp", _batch(100_000), seq=3)
    raw = encode(env)
    assert len(raw) < 100_000 * 30  # 28 bytes per point in arrays, not 100 k JSON objects
    back = decode(raw)
    assert back == env
    idx, step, ts, val = back.payload.arrays()
    assert val[-1] == 1.0 and step[-1] == 99_999 and back.payload.text_arrays()[3] == ["red"]


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(v=99), "unsupported schema_version 99"),
    (lambda d: d.update(v=[1]), r"unsupported schema_version \[1\]"),  # found by the hypothesis suite
    (lambda d: d.update(v=True), "unsupported schema_version True"),
    (lambda d: d.pop("r"), "envelope field missing"),
    (lambda d: d.update(k="logs"), "differs from payload kind"),
    (lambda d: d["p"].update(step=b"\x00" * 3), "differ in length"),
    (lambda d: d["p"].update(idx=np.full(5, 7, "<u4").tobytes()), "outside the name table"),
    (lambda d: d.update(r=""), "run_id"),
    (lambda d: d.update(q=-1), "seq"),
])
def test_decode_names_what_is_wrong(mutate, message):
    d = msgpack.unpackb(encode(make_envelope("run-1", "exp", _batch(), seq=1)), raw=False)
    mutate(d)
    with pytest.raises(EventError, match=message):
        decode(msgpack.packb(d, use_bin_type=True))


def test_decode_rejects_garbage():
    with pytest.raises(EventError, match="not a msgpack message"):
        decode(b"\xc1")
    with pytest.raises(EventError, match="not a map"):
        decode(msgpack.packb([1, 2]))


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=200),
       st.integers(min_value=1, max_value=5))
@hsettings(max_examples=60, deadline=None)
def test_aggregates_match_numpy_over_batches(values, n_batches):
    v = np.array(values)
    state: dict = {}
    bounds = np.linspace(0, len(v), n_batches + 1).astype(int)
    names = [MetricName(name="x", kind="scalar", dtype="float")]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            b = MetricBatch.from_arrays(names, np.zeros(hi - lo), np.arange(lo, hi), np.arange(lo, hi), v[lo:hi])
            merge(state, batch_aggregates(b))
    row = state[metric_key("x", "")]
    assert row[0] == len(v)
    finite = v[~np.isnan(v)]
    if len(finite):
        assert row[1] == finite.min() and row[2] == finite.max()
    else:
        assert math.isnan(row[1]) and math.isnan(row[2])
    assert np.array_equal([row[3], row[4]], [v[0], v[-1]], equal_nan=True)
    assert row[5] == len(v) - 1


def test_transition_table_is_complete_and_terminal_states_are_final():
    assert set(TRANSITIONS) == set(RunStatus)
    for terminal in (RunStatus.Completed, RunStatus.Failed, RunStatus.Canceled):
        for target in RunStatus:
            ok, reason = check_transition(terminal, target)
            assert ok == (target == terminal)
    assert check_transition(None, RunStatus.Running) == (True, "")
    assert check_transition(RunStatus.Queued, RunStatus.Finalizing)[0] is False


def test_state_logic_applies_rejects_and_alerts():
    logic = RunStateLogic()
    st_ = RunStateLogic.new_state("r", "e")
    src = this_source()
    outs = logic.handle(make_envelope("r", "e", RunCreated(created_ts=1.0), seq=1, source=src), st_)
    assert st_["status"] == "Running" and st_["start_ts"] == 1.0
    outs = logic.handle(make_envelope("r", "e", StatusChanged(status=RunStatus.Failed, error={"message": "boom"}),
                                      seq=2, source=src), st_)
    kinds = [o[2].payload.kind for o in outs]
    assert kinds == ["transition", "alert", "run_state"] and st_["status"] == "Failed"
    outs = logic.handle(make_envelope("r", "e", StatusChanged(status=RunStatus.Running), seq=3, source=src), st_)
    tr = outs[0][2].payload
    assert not tr.applied and st_["status"] == "Failed" and st_["illegal_transitions"] == 1
    # a repeated event (same source and seq) changes nothing; the current snapshot is sent again, same version
    before = dict(st_)
    again = logic.handle(make_envelope("r", "e", StatusChanged(status=RunStatus.Running), seq=3, source=src), st_)
    assert st_ == before and [env.payload.kind for _, _, env in again] == ["run_state"]
    assert again[0][2].payload.version == st_["version"] and again[0][2].payload.snapshot["status"] == "Failed"


def test_sdk_import_stays_light():
    import subprocess
    import sys

    code = ("import sys; from runwatch import Workspace, Experiment, Run; "
            "print(sorted(m for m in ('faust', 'chdb', 'clickhouse_connect', 'aiohttp', 'pyarrow', 'httpx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@given(sizes=st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=30), min_size=1, max_size=4),
       limit=st.integers(1, 120), whole=st.sets(st.integers(0, 3)))
def test_sink_chunks_cover_a_fetch_once_in_order_within_the_limit(sizes, limit, whole):
    """A fetch is written in chunks: every message exactly once, each partition's messages in order and as
    contiguous ranges, a chunk over the limit only when it is one message (or a range replayed whole)."""
    from types import SimpleNamespace

    from runwatch.sinks.sink import _chunks

    ranges = {}
    for tp, lens in enumerate(sizes):
        msgs = [SimpleNamespace(offset=100 * tp + i, value=b"x" * n) for i, n in enumerate(lens)]
        ranges[tp] = (msgs[0].offset, msgs[-1].offset, msgs)
    whole = {tp for tp in whole if tp in ranges}
    chunks = _chunks(ranges, limit, whole)
    got: dict[int, list[int]] = {tp: [] for tp in ranges}
    for chunk in chunks:
        assert chunk
        size = 0
        for tp, (start, end, msgs) in chunk.items():
            assert [m.offset for m in msgs] == list(range(start, end + 1))  # contiguous, in order
            got[tp] += [m.offset for m in msgs]
            size += sum(len(m.value) for m in msgs)
        one_message = sum(len(msgs) for _, _, msgs in chunk.values()) == 1
        assert size <= limit or one_message or (len(chunk) == 1 and next(iter(chunk)) in whole)
    for tp, (_, _, msgs) in ranges.items():
        assert got[tp] == [m.offset for m in msgs]  # every message once, in order
    for tp in whole:
        assert sum(tp in c for c in chunks) == 1


@pytest.mark.parametrize("path", ["stream", "client"])
def test_sink_rows_land_exactly_in_chdb(tmp_path, path):
    """The sink's columnar build (dictionary columns, Enum numbers, rows pre-sorted for the part) stores
    every point as sent, on a real chDB: several runs, every kind and dtype, text values, steps out of order.
    "stream": the sink's ArrowStream into chDB; "client": clickhouse-connect's insert_arrow (Arrow file
    format), the path a ClickHouse server gets."""
    import clickhouse_connect

    from runwatch.sinks.rows import RowBuilder
    from runwatch.sinks.schema import DTYPE_CODES, KIND_CODES, migrate
    from runwatch.sinks.store import ClickHouseStore

    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path / 'chdb'}")
    migrate(client)
    types = dict(client.query("SELECT name, type FROM system.columns WHERE database = 'runwatch' "
                              "AND table = 'metric_points'").result_rows)
    for column, codes in (("kind", KIND_CODES), ("dtype", DTYPE_CODES)):
        assert types[column] == "Enum8(" + ", ".join(f"'{k}' = {v}" for k, v in codes.items()) + ")"
    rng = np.random.default_rng(7)
    expected = set()
    builder = RowBuilder()
    for r, run_id in enumerate(["run-b", "run-a", "run-c"]):
        names = [MetricName(name=n, kind=k, column=c, dtype=d) for n, k, c, d in (
            ("loss", "scalar", "", "float"), ("acc", "list", "", "int"), ("curve", "row", "x", "float"),
            ("curve", "row", "y", "bool"), ("img", "image", "", "str"))]
        for seq in range(2):
            n = 40
            idx = rng.integers(0, 4, n)
            step = rng.permutation(n) + 100 * seq  # out of order within a batch
            ts = 1_700_000_000_000_000 + rng.integers(0, 10_000, n)
            val = rng.random(n)
            batch = MetricBatch.from_arrays(names, idx, step, ts, val, [4], [seq], [ts[0]], [f"img-{r}-{seq}.png"])
            builder.add(make_envelope(run_id, f"exp-{r}", batch, seq))
            for i in range(n):
                nm = names[int(idx[i])]
                expected.add((run_id, f"exp-{r}", nm.name, nm.kind.value, nm.column, nm.dtype.value, int(step[i]),
                              round(float(val[i]), 12), "", seq))
            expected.add((run_id, f"exp-{r}", "img", "image", "", "str", seq, None, f"img-{r}-{seq}.png", seq))
    settings = {"insert_deduplication_token": "unit", "async_insert": 0, "insert_deduplicate": 1}
    if path == "stream":
        ClickHouseStore(client, Settings.load()).insert("metric_points", builder.tables()["metric_points"], settings)
    else:
        client.insert_arrow("runwatch.metric_points", builder.tables()["metric_points"], settings=settings)
    rows = client.query("SELECT run_id, experiment, name, kind, column, dtype, step, value, text, seq "
                        "FROM runwatch.metric_points").result_rows
    got = {(r[0], r[1], r[2], r[3], r[4], r[5], r[6], None if math.isnan(r[7]) else round(r[7], 12), r[8], r[9])
           for r in rows}
    assert len(rows) == len(expected) == 3 * 2 * 41
    assert got == expected


def test_sink_recomputes_aggregates_that_fell_short_of_the_stored_points(tmp_path):
    """What the processors may leave behind after a crash (a skipped batch): the sink's check of finished runs
    recomputes the aggregates from the points on a real chDB, leaves complete ones alone, and waits when the
    points are behind the aggregates (the sink has not stored everything yet)."""
    import time

    import clickhouse_connect

    from runwatch.sinks.repair import AggregatesCheck
    from runwatch.sinks.rows import RowBuilder
    from runwatch.sinks.schema import migrate
    from runwatch.sinks.store import ClickHouseStore

    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path / 'chdb'}")
    migrate(client)
    store = ClickHouseStore(client, Settings.load())
    names = [MetricName(name="loss", kind="scalar", dtype="float"), MetricName(name="note", kind="scalar", dtype="str")]
    builder = RowBuilder()
    values = {"short": [3.0, float("nan"), 1.0, 7.0, 2.0], "whole": [5.0, 4.0], "behind": [1.0]}
    for run_id, vals in values.items():
        n = len(vals)
        ts = 1_700_000_000_000_000 + np.minimum(np.arange(n), 2)  # the last three points share one microsecond
        batch = MetricBatch.from_arrays(names, np.zeros(n, np.uint32), np.arange(n), ts,
                                        np.array(vals), [1], [0], [1_700_000_000_000_000], ["hello"])
        builder.add(make_envelope(run_id, "exp", batch, 1))
    store.insert("metric_points", builder.tables()["metric_points"])
    agg = {"name": "loss", "column": "", "kind": "scalar", "min": 3.0, "max": 3.0, "first": 3.0, "last": 3.0,
           "last_text": "", "last_step": 0, "last_ts": 1_700_000_000_000_000, "version": 4}
    builder = RowBuilder()
    for run_id, count in (("short", 1), ("whole", 2), ("behind", 9)):  # 'short' lost four points' batch
        builder.add(make_envelope(run_id, "exp", MetricAggregates(source_event="e", rows=[dict(agg, count=count)]), 1))
        builder.add(make_envelope(run_id, "exp", MetricAggregates(source_event="e", rows=[dict(
            agg, name="note", count=1, min=math.nan, max=math.nan, first=math.nan, last=math.nan, last_text="hello")]), 1))
    store.insert("metric_aggregates", builder.tables()["metric_aggregates"])

    check = AggregatesCheck(store, Settings.load(aggregates_check_delay=0.0))
    check.due = {r: (time.time(), 0) for r in values}
    check.run()
    rows = {(r[0], r[1]): r[2:] for r in client.query(
        "SELECT run_id, name, count, min, max, first, last, last_text, last_step, version "
        "FROM runwatch.metric_aggregates FINAL").result_rows}
    assert rows[("short", "loss")][:7] == (5, 1.0, 7.0, 3.0, 2.0, "", 4) and rows[("short", "loss")][7] == 5
    assert rows[("whole", "loss")][0] == 2 and rows[("whole", "loss")][7] == 4      # complete: left alone
    assert rows[("behind", "loss")][0] == 9 and rows[("behind", "loss")][7] == 4    # points behind: not touched
    assert rows[("short", "note")][0] == 1 and rows[("short", "note")][7] == 4
    assert check.repaired == 1 and check.checked == 3
    assert list(check.due) == ["behind"]  # looked at again later


def test_a_failing_aggregates_check_never_holds_up_the_sink(tmp_path, caplog):
    """If the check itself fails (here: its table is gone), the sink logs it and looks again later."""
    import time

    import clickhouse_connect

    from runwatch.sinks.repair import AggregatesCheck
    from runwatch.sinks.schema import migrate
    from runwatch.sinks.store import ClickHouseStore

    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path / 'chdb'}")
    migrate(client)
    client.command("DROP TABLE runwatch.metric_aggregates")
    check = AggregatesCheck(ClickHouseStore(client, Settings.load()), Settings.load(aggregates_check_delay=5.0))
    check.due = {"r1": (time.time(), 0), "r2": (time.time(), 5)}
    check.run_safely()
    assert "checking finished runs' aggregates failed" in caplog.text
    assert list(check.due) == ["r1"] and check.due["r1"][1] == 1  # r2 had its 5 tries
    assert check.due["r1"][0] >= time.time() + 4


def _sink_chunk(tmp_path, **settings):
    """A sink on a real chDB with one prepared chunk of three metric events (30 points), not inserted yet."""
    import clickhouse_connect
    from aiokafka import TopicPartition
    from aiokafka.structs import ConsumerRecord

    from runwatch.core.events import encode
    from runwatch.sinks.schema import migrate
    from runwatch.sinks.sink import Sink
    from runwatch.sinks.store import ClickHouseStore

    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path / 'chdb'}")
    migrate(client)
    sink = Sink(Settings.load(**settings), ClickHouseStore(client, Settings.load(**settings)), "127.0.0.1:1")
    tp = TopicPartition(sink.settings.topic("metrics"), 0)
    names = [MetricName(name="loss", kind="scalar", dtype="float")]
    msgs = [ConsumerRecord(tp.topic, 0, i, 0, 0, b"run-1", encode(make_envelope("run-1", "exp", MetricBatch.from_arrays(
        names, np.zeros(10, np.uint32), np.arange(10) + 10 * i, 1_700_000_000_000_000 + np.arange(10), np.ones(10)), i)),
        None, 5, 0, []) for i in range(3)]
    return client, sink, sink.prepare({tp: (0, 2, msgs)})


def _count(client, table: str) -> int:
    return client.query(f"SELECT count() FROM runwatch.{table}").result_rows[0][0]


def test_the_sink_never_counts_an_insert_chdb_did_not_keep(tmp_path):
    """chDB reported a streaming insert as written and kept nothing when its disk was nearly full, and the
    sink committed the offsets: points lost without a word. Now every insert on chDB must show as a new part
    (and its rows, in append-only tables), or the chunk fails and nothing is committed. ClickHouse drops an
    insert whose deduplication token it has seen, which from the sink looks exactly like that loss."""
    from runwatch.sinks.store import InsertLostError

    client, sink, ready = _sink_chunk(tmp_path)
    assert sink.store.chdb_dir == str(tmp_path / "chdb")
    token, tables = ready.batch.tables[0]
    sink.store.insert("metric_points", tables["metric_points"].slice(0, 1),
                      {"insert_deduplication_token": token, "async_insert": 0, "insert_deduplicate": 1})
    for attempt in range(2):
        with pytest.raises(InsertLostError, match="metric_points and stored 0 of its 30 rows"):
            sink.store.write(ready.batch)
        # the intent was stored and verified once: a retry does not write it again
        assert _count(client, "sink_intents") == 1 and _count(client, "metric_points") == 1
        assert sink.stats.events == 0 and sink.stats.rows["metric_points"] == 0 and not sink._stored_next
    # a chunk whose token is new is stored, verified and counted; its intent's check passes again
    ready.batch.tables[0] = (token + ":new", tables)
    sink.store.write(ready.batch)
    sink._stored(ready)
    assert _count(client, "metric_points") == 31 and sink.stats.events == 3


def test_the_sink_writes_nothing_while_the_disk_is_nearly_full(tmp_path):
    """Below `sink_min_free_mb` free on chDB's disk the sink inserts nothing and says why; it retries, and the
    broker keeps the events (here the limit is set above the disk's free space)."""
    from runwatch.sinks.store import DiskFullError

    client, sink, ready = _sink_chunk(tmp_path, sink_min_free_mb=1 << 40)
    with pytest.raises(DiskFullError, match=r"MiB free on the disk of .*sink_min_free_mb = 1,099,511,627,776"):
        sink.store.write(ready.batch)
    assert _count(client, "sink_intents") == 0 and _count(client, "metric_points") == 0
    sink.store.settings = Settings.load(sink_min_free_mb=0)
    sink.store.write(ready.batch)
    assert _count(client, "metric_points") == 30


def test_a_database_of_an_earlier_schema_is_migrated_in_place(tmp_path, monkeypatch):
    """A store written by an earlier runwatch (schema 2, metric_points in ZSTD) takes the later migrations
    on the worker's next start: its points stay readable, the columns' codec becomes LZ4, new points are
    stored beside the old ones, and migrating again does nothing."""
    import clickhouse_connect

    import runwatch.sinks.schema as schema
    from runwatch.sinks.rows import RowBuilder
    from runwatch.sinks.store import ClickHouseStore

    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path / 'chdb'}")
    every = schema.MIGRATIONS
    monkeypatch.setattr(schema, "MIGRATIONS", [m for m in every if m[0] <= 2])
    assert schema.migrate(client) == 2

    def store(run_id: str) -> None:
        builder = RowBuilder()
        loss = MetricName(name="loss", kind="scalar", dtype="float")
        batch = MetricBatch.from_arrays([loss], np.zeros(3, np.uint32), np.arange(3),
                                        1_700_000_000_000_000 + np.arange(3), np.array([3.0, 2.0, 1.0]))
        builder.add(make_envelope(run_id, "exp", batch, 1))
        ClickHouseStore(client, Settings.load()).insert("metric_points", builder.tables()["metric_points"])

    def codec(column: str) -> str:
        return client.query("SELECT compression_codec FROM system.columns WHERE database = 'runwatch' AND "
                            "table = 'metric_points' AND name = {c:String}",
                            parameters={"c": column}).result_rows[0][0]

    store("old")
    assert codec("value") == "CODEC(ZSTD(1))"
    monkeypatch.setattr(schema, "MIGRATIONS", every)
    assert schema.migrate(client) == schema.LATEST == 6
    assert schema.migrate(client) == 6  # applied once
    assert [r[0] for r in client.query("SELECT version FROM runwatch.schema_migrations ORDER BY version")
            .result_rows] == [1, 2, 3, 4, 5, 6]
    assert (codec("value"), codec("step"), codec("run_id")) == ("CODEC(LZ4)", "CODEC(Delta(8), LZ4)", "CODEC(LZ4)")
    store("new")
    rows = client.query("SELECT run_id, groupArray(value) FROM (SELECT run_id, value FROM runwatch.metric_points "
                        "ORDER BY run_id, step) GROUP BY run_id ORDER BY run_id").result_rows
    assert rows == [("new", [3.0, 2.0, 1.0]), ("old", [3.0, 2.0, 1.0])]


def test_metrics_read_shows_the_live_tail_and_each_point_once(tmp_path):
    """The read API's merge of stored points and the live tail's events (runwatch/api/live.py), on a real chDB: an
    event stored between the tail's answer and the query, and a producer's repeat of a pending event, are
    shown once; the result is exactly what the same read gives once everything is stored."""
    import clickhouse_connect

    from runwatch.api.queries import Queries
    from runwatch.sinks.rows import RowBuilder
    from runwatch.sinks.schema import migrate
    from runwatch.sinks.store import ClickHouseStore

    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path / 'chdb'}")
    migrate(client)
    names = [MetricName(name="loss", kind="scalar", dtype="float"), MetricName(name="note", kind="scalar", dtype="str"),
             MetricName(name="curve", kind="row", column="x", dtype="int")]
    src = this_source()

    def event(seq: int, steps: list[int]):
        n = len(steps)
        batch = MetricBatch.from_arrays(names, [i % 3 if i % 3 != 1 else 0 for i in range(n)], steps,
                                        [1_700_000_000_000_000 + 1000 * seq + i for i in range(n)],
                                        [seq + i / 10 for i in range(n)], [1], [steps[0]],
                                        [1_700_000_000_000_000 + 1000 * seq], [f"note {seq}"])
        return make_envelope("run-1", "exp", batch, seq, source=src)

    stored, pending = [event(0, [0, 1, 2, 3]), event(1, [4, 5, 6])], [event(2, [7, 2, 9])]

    def store(envs, token):
        b = RowBuilder()
        for env in envs:
            b.add(env)
        ClickHouseStore(client, Settings.load()).insert("metric_points", b.tables()["metric_points"], {
            "insert_deduplication_token": token, "async_insert": 0, "insert_deduplicate": 1})

    store(stored, "a")
    q = Queries(client)
    asked = []

    def live(run_ids):
        asked.append(list(run_ids))
        # the tail still holds seq 1 (stored since), seq 2, and a producer's repeat of seq 2
        return {"run-1": [stored[1]] + pending + [pending[0]]}

    merged = {name: q.metrics("run-1", name, live=live) for name in (None, "loss", "note", "curve")}
    assert asked == [["run-1"]] * 4
    # seq 2's loss at step 2 goes between the stored steps 1 and 3; each note once
    assert merged["loss"] == {"loss": [0.0, 0.1, 2.1, 0.3, 1.0, 1.1, 2.0]}
    assert merged["note"] == {"note": ["note 0", "note 1", "note 2"]}
    store(pending, "b")
    assert merged == {name: q.metrics("run-1", name) for name in (None, "loss", "note", "curve")}


def test_runs_sorted_by_a_metric_carry_each_runs_aggregates(tmp_path):
    """`Queries.runs` with a sort metric takes that metric's aggregate from the sorting query itself, and reads
    it again only for runs that lack it there: a run whose metric of that name is a table (columns), a run
    without it. On a real chDB, the listing equals each run's aggregates read on their own, and the runs
    without the metric come last in either order (they came first in ascending order until the join was
    told to give them NULL)."""
    import clickhouse_connect

    from runwatch.api.queries import Queries
    from runwatch.sinks.schema import migrate

    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path / 'chdb'}")
    migrate(client)
    runs = [("a", "e", 1), ("b", "e", 2), ("c", "e", 3), ("d", "other", 4), ("x", "all", 5), ("y", "all", 6)]
    client.insert("runwatch.runs", [[r, e, "Completed", 1_700_000_000 + t, "{}", 1] for r, e, t in runs],
                  column_names=["run_id", "experiment", "status", "created_time", "tags_json", "version"])
    aggs = [("a", "e", "m", "", 1.0), ("b", "e", "m", "p", 0.1), ("b", "e", "m", "q", 0.2), ("a", "e", "n", "", 9.0),
            ("d", "other", "m", "", 0.5), ("x", "all", "m", "", 3.0), ("y", "all", "m", "", 2.0),
            ("y", "all", "n", "", 8.0)]
    client.insert("runwatch.metric_aggregates",
                  [[r, e, n, c, "row" if c else "scalar", 2, v, v + 1, v, v, "", 1, 1] for r, e, n, c, v in aggs],
                  column_names=["run_id", "experiment", "name", "column", "kind", "count", "min", "max", "first",
                                "last", "last_text", "last_step", "version"])
    q = Queries(client)
    for experiment, order, desc_order, metrics in (("e", ["a", "c", "b"], ["a", "c", "b"], ["m", "n"]),
                                                   ("all", ["y", "x"], ["x", "y"], ["m"]),
                                                   ("all", ["y", "x"], ["x", "y"], ["n"])):
        listed = q.runs(experiment=experiment, sort_metric="m", sort="min", order="asc", metrics=metrics)
        # the runs without the metric as a scalar go last, the newest first
        assert [r["run_id"] for r in listed] == order
        desc = q.runs(experiment=experiment, sort_metric="m", sort="min", order="desc", metrics=metrics)
        assert [r["run_id"] for r in desc] == desc_order
        alone = q.aggregates(order, list(dict.fromkeys(metrics + ["m"])))
        assert {r["run_id"]: r["metrics"] for r in listed} == {r: alone.get(r, {}) for r in order}


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64 - 1) | st.floats()
    | st.text(st.characters(exclude_categories=())),  # lone surrogates too
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20)


@hsettings(max_examples=300, deadline=None)
@given(_json_values)
def test_the_api_writes_and_the_client_reads_what_json_would(value):
    """The read API encodes with ujson and the SDK's client decodes with it, for speed; both must agree with
    Python's json: NaN and ±inf as tokens, floats to the last bit, any text (slashes, control characters,
    non-ASCII, lone surrogates)."""
    import json

    import httpx

    from runwatch.api.server import _dumps
    from runwatch.core.client import _result

    text = _dumps(value)
    assert json.dumps(json.loads(text)) == json.dumps(value)
    assert json.dumps(_result(httpx.Response(200, content=text.encode()))) == json.dumps(value)


def test_the_api_writes_other_values_as_text():
    import datetime as dt
    import json

    from runwatch.api.server import _dumps

    when = dt.datetime(2026, 11, 30, 5, 0, tzinfo=dt.timezone.utc)
    assert json.loads(_dumps({"t": when, "n": float("nan")}))["t"] == str(when)
    assert _dumps(["a/b"]) == '["a/b"]'

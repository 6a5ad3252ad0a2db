"""The training-side SDK against a real broker: exact events, bad input, broker outages, fork, threads."""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import pytest

from conftest import Broker, consume, decoded, log_rows_table_tags, unique_name, wait_until
from runwatch import Experiment, MetricError, MetricTypeError, Workspace
from runwatch.core.events import MetricBatch, RunStatus


def metric_points(envs, run_id=None):
    """Flatten metric batches into (run, name, kind, column, dtype, step, value) in arrival order."""
    out = []
    for e in envs:
        p = e.payload
        if not isinstance(p, MetricBatch) or (run_id and e.run_id != run_id):
            continue
        idx, step, _ts, val = p.arrays()
        for i, s, v in zip(idx, step, val):
            n = p.names[int(i)]
            out.append((e.run_id, n.name, n.kind.value, n.column, n.dtype.value, int(s), float(v)))
        s_idx, s_step, _s_ts, texts = p.text_arrays()
        for i, s, t in zip(s_idx, s_step, texts):
            n = p.names[int(i)]
            out.append((e.run_id, n.name, n.kind.value, n.column, n.dtype.value, int(s), t))
    return out


def by_name(points, name):
    return [p for p in points if p[1] == name]


def test_every_kind_is_sent_exactly(sdk_settings):
    ws = Workspace.from_config()
    exp = Experiment(ws, unique_name())
    run = exp.start_logging(display_name="baseline")
    run.log("loss", 0.42)
    run.log("loss", 0.41)
    run.log(name="loss", value=np.float32(0.40), step=200)
    run.log("Category", "Red")
    run.log("flag", True)
    run.log("epochs", np.int64(3))
    run.log_list("fibonacci", (i * 2 for i in [0, 1, 1, 2, 3, 5]))
    run.log_list("arr", np.array([0.5, 1.5]))
    log_rows_table_tags(run)
    with run.child_run(name="fold-1") as child:
        child.log("acc", 0.91)
    run.complete()
    prefix = sdk_settings.topic_prefix
    msgs = consume(sdk_settings.bootstrap_servers, [prefix + "metrics", prefix + "runs"],
                   lambda got: sum(1 for m in got if m.topic.endswith("runs")) >= 6)
    envs = decoded(msgs)
    pts = metric_points(envs, run.id)
    assert by_name(pts, "loss") == [
        (run.id, "loss", "scalar", "", "float", 0, 0.42), (run.id, "loss", "scalar", "", "float", 1, 0.41),
        (run.id, "loss", "scalar", "", "float", 200, float(np.float32(0.40)))]
    assert by_name(pts, "Category") == [(run.id, "Category", "scalar", "", "str", 0, "Red")]
    assert by_name(pts, "flag") == [(run.id, "flag", "scalar", "", "bool", 0, 1.0)]
    assert by_name(pts, "epochs") == [(run.id, "epochs", "scalar", "", "int", 0, 3.0)]
    assert [(p[5], p[6]) for p in by_name(pts, "fibonacci")] == [(0, 0), (1, 2), (2, 2), (3, 4), (4, 6), (5, 10)]
    assert {p[2] for p in by_name(pts, "fibonacci")} == {"list"}
    assert [(p[4], p[5], p[6]) for p in by_name(pts, "arr")] == [("float", 0, 0.5), ("float", 1, 1.5)]
    rows = sorted((p[3], p[5], p[6]) for p in by_name(pts, "cosine wave"))
    assert rows == [("angle", 0, 0.5), ("angle", 1, 1.0), ("cos", 0, np.cos(0.5)), ("cos", 1, np.cos(1.0))]
    assert {p[2] for p in by_name(pts, "cosine wave")} == {"row"}
    table = sorted((p[3], p[5], p[6]) for p in by_name(pts, "sine wave"))
    assert table == [("angle", 0, 0.0), ("angle", 1, 0.5), ("sine", 0, 0.0), ("sine", 1, 0.479)]
    assert metric_points(envs, child.id) == [(child.id, "acc", "scalar", "", "float", 0, 0.91)]

    lifecycle = [(e.run_id, e.payload.kind) for e in envs if e.kind != "metrics" and e.kind != "heartbeat"]
    # the two tag calls of one moment travel as one event: the wire carries what changed, once; the first
    # properties event records the tables' columns in the order they were logged (read back in that order)
    assert lifecycle == [(run.id, "run_created"), (run.id, "properties"), (run.id, "tags"), (run.id, "properties"),
                         (child.id, "run_created"), (child.id, "status"), (run.id, "status")]
    created = next(e for e in envs if e.run_id == run.id and e.kind == "run_created")
    assert created.payload.display_name == "baseline" and created.experiment == exp.name
    tags = [e.payload.tags for e in envs if e.run_id == run.id and e.kind == "tags"]
    assert tags == [{"optimizer": "adam", "worth another look": None}]
    child_created = next(e for e in envs if e.run_id == child.id and e.kind == "run_created")
    assert child_created.payload.parent_run_id == run.id
    statuses = [(e.run_id, e.payload.status) for e in envs if e.kind == "status"]
    assert statuses == [(child.id, RunStatus.Completed), (run.id, RunStatus.Completed)]
    seqs = [(e.run_id, e.kind == "metrics", e.seq) for e in envs if e.source.pid == os.getpid()]
    assert len(seqs) == len(set(seqs))  # one source, every seq once per run and topic


def test_nan_and_infinity_are_kept(sdk_settings):
    run = Experiment(Workspace.from_config(), unique_name()).start_logging()
    for v in (math.nan, math.inf, -math.inf, 1.0):
        run.log("odd", v)
    run.flush()
    msgs = consume(sdk_settings.bootstrap_servers, [sdk_settings.topic("metrics")],
                   lambda got: len(metric_points(decoded(got))) >= 4)
    vals = [p[6] for p in metric_points(decoded(msgs), run.id)]
    assert math.isnan(vals[0]) and vals[1:] == [math.inf, -math.inf, 1.0]


BAD_INPUT = [
    (lambda r: r.log("x", None), MetricTypeError, "run.log: value is None"),
    (lambda r: r.log("x", [1, 2]), MetricTypeError, "use log_list"),
    (lambda r: r.log("x", {"a": 1}), MetricTypeError, "not dict"),
    (lambda r: r.log("x", object()), MetricTypeError, "not object"),
    (lambda r: r.log("", 1.0), MetricError, "name is empty"),
    (lambda r: r.log("y" * 300, 1.0), MetricError, "at most 255"),
    (lambda r: r.log(5, 1.0), MetricTypeError, "name must be a string"),
    (lambda r: r.log("x", 1.0, step="three"), MetricTypeError, "step must be an integer"),
    (lambda r: r.log_list("l", 5), MetricTypeError, "iterable of values"),
    (lambda r: r.log_list("l", [1, None]), MetricTypeError, "item 1 is None"),
    (lambda r: r.log_table("t", {"a": [1, 2], "b": [1]}), MetricError, "differ in length"),
    (lambda r: r.log_table("t", [1, 2]), MetricTypeError, "non-empty dict"),
    (lambda r: r.log_row("r"), MetricError, "keyword arguments"),
    (lambda r: r.log_row("r", x=[1]), MetricTypeError, "column 'x'"),
    (lambda r: (r.log_row("r2", x=1, y=2), r.log_row("r2", x=1, z=2)), MetricError, "has columns ['x', 'y']"),
    (lambda r: (r.log("k", 1.0), r.log_list("k", [1])), MetricError, "was logged as a scalar"),
    (lambda r: r.add_properties({"p": None}), MetricTypeError, "'p' must be a string"),
    (lambda r: (r.add_properties({"a": "1"}), r.add_properties({"a": "2"})), MetricError, "immutable"),
    (lambda r: r.tag("t", [1]), MetricTypeError, "tag 't'"),
]


@pytest.mark.parametrize("call,exc,message", BAD_INPUT, ids=[m for _, _, m in BAD_INPUT])
def test_bad_input_gets_a_clear_error(sdk_settings, call, exc, message):
    run = Experiment(Workspace.from_config(), unique_name()).start_logging()
    with pytest.raises(exc) as info:
        call(run)
    assert message in str(info.value)
    run.log("still works", 1.0)  # the run is usable after the error


def test_metric_name_cap(sdk_settings, monkeypatch):
    monkeypatch.setenv("RUNWATCH_MAX_METRIC_NAMES", "10")
    run = Experiment(Workspace.from_config(), unique_name()).start_logging()
    for i in range(10):
        run.log(f"m{i}", 1.0)
    with pytest.raises(MetricError, match="already has 10 distinct metric names"):
        run.log("one too many", 1.0)
    run.log("m3", 2.0)  # known names still work


def test_bad_experiment_name():
    with pytest.raises(MetricError, match="must be 1-255 characters"):
        Experiment(Workspace(), "bad name/with slash")


def _own_broker_env(monkeypatch, tmp_path, broker, prefix):
    monkeypatch.setenv("RUNWATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RUNWATCH_BOOTSTRAP_SERVERS", broker.bootstrap)
    monkeypatch.setenv("RUNWATCH_BROKER_KIND", "tansu")
    monkeypatch.setenv("RUNWATCH_TOPIC_PREFIX", prefix)
    monkeypatch.setenv("RUNWATCH_REQUEST_TIMEOUT_MS", "2000")


def test_broker_down_at_start_then_up(tmp_path, monkeypatch):
    b = Broker(log_dir=tmp_path)  # not started yet: nothing listens on its port
    _own_broker_env(monkeypatch, tmp_path, b, "down.")
    try:
        run = Experiment(Workspace.from_config(), unique_name()).start_logging()
        for i in range(5000):
            run.log("loss", float(i))
        assert run.flush(15)  # True: everything is in the spool
        em = run.emitter
        assert em.stats.events_spooled >= 1 and em.stats.events_sent == 0
        assert list((tmp_path / "home" / "spool").iterdir())
        b.start()
        for i in range(5000, 6000):
            run.log("loss", float(i))
        wait_until(lambda: run.flush(2) and not em.spooling and em.stats.events_sent >= 2, 30,
                   what="spool drained")
        msgs = consume(b.bootstrap, ["down.metrics"], lambda got: len(metric_points(decoded(got))) >= 6000)
        steps = [p[5] for p in metric_points(decoded(msgs), run.id)]
        assert steps == list(range(6000))  # all, in order, none twice
    finally:
        from runwatch.producers.emitter import close_all

        close_all(5)
        b.stop()


def test_broker_killed_mid_stream(tmp_path, monkeypatch):
    b = Broker(log_dir=tmp_path).start()
    _own_broker_env(monkeypatch, tmp_path, b, "kill.")
    try:
        run = Experiment(Workspace.from_config(), unique_name()).start_logging()
        em = run.emitter
        for i in range(1000):
            run.log("loss", float(i))
        assert run.flush(10) and em.stats.events_sent >= 1
        b.kill()
        for i in range(1000, 3000):
            run.log("loss", float(i))
        wait_until(lambda: em.stats.events_spooled >= 1, 30, what="events spooled while the broker is dead")
        b2 = Broker(port=b.port, log_dir=tmp_path).start()  # the same address; memory storage starts empty
        try:
            wait_until(lambda: run.flush(2) and not em.spooling, 40, what="spool drained after restart")
            msgs = consume(b2.bootstrap, ["kill.metrics"],
                           lambda got: any(p[5] == 2999 for p in metric_points(decoded(got))))
            steps = [p[5] for p in metric_points(decoded(msgs), run.id)]
            # what the dead broker had acknowledged died with its memory; everything after is here, in order
            assert steps == sorted(set(steps)) and steps[-1] == 2999 and 1000 in steps
            assert em.stats.points_dropped == 0
        finally:
            b2.stop()
    finally:
        from runwatch.producers.emitter import close_all

        close_all(5)
        b.stop()


def test_fork_parent_and_child_both_deliver(sdk_settings):
    run = Experiment(Workspace.from_config(), unique_name()).start_logging()
    run.log("parent", 1.0)
    pid = os.fork()
    if pid == 0:  # the child: log, flush, leave without running the parent's atexit handlers twice
        code = 1
        try:
            for i in range(100):
                run.log("child", float(i))
            code = 0 if run.flush(15) else 2
        finally:
            os._exit(code)
    run.log("parent", 2.0)
    run.flush()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    msgs = consume(sdk_settings.bootstrap_servers, [sdk_settings.topic("metrics")],
                   lambda got: len(metric_points(decoded(got))) >= 102)
    envs = decoded(msgs)
    pts = metric_points(envs, run.id)
    assert [p[6] for p in by_name(pts, "parent")] == [1.0, 2.0]
    assert [p[6] for p in by_name(pts, "child")] == [float(i) for i in range(100)]
    assert {e.source.pid for e in envs} == {os.getpid(), pid}


def test_eight_threads_at_once(sdk_settings):
    run = Experiment(Workspace.from_config(), unique_name()).start_logging()
    n = 5000

    def work(k: int) -> None:
        for i in range(n):
            run.log(f"thread{k}", float(i))
            run.log("shared", float(k))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert run.flush(15)
    msgs = consume(sdk_settings.bootstrap_servers, [sdk_settings.topic("metrics")],
                   lambda got: len(metric_points(decoded(got))) >= 16 * n, timeout=30)
    pts = metric_points(decoded(msgs), run.id)
    for k in range(8):
        assert [p[6] for p in by_name(pts, f"thread{k}")] == [float(i) for i in range(n)]
    shared = by_name(pts, "shared")
    assert len(shared) == 8 * n
    assert sorted(p[5] for p in shared) == list(range(8 * n))  # every call got its own step
    assert run.emitter.stats.points_dropped == 0


def test_the_kafka_clients_connection_errors_are_quiet_unless_the_user_set_its_level(sdk_settings, monkeypatch):
    # while the broker is away (runwatch down/up mid-run) aiokafka logs every failed connection: hundreds of lines
    # on the training's terminal and in its captured logs; the emitter reports the outage itself
    import logging

    client = logging.getLogger("aiokafka")
    monkeypatch.setattr(client, "level", logging.NOTSET)
    run = Experiment(Workspace.from_config(), unique_name()).start_logging()
    run.log("x", 1.0)
    assert run.flush(10)
    assert client.level == logging.CRITICAL
    monkeypatch.setenv("RUNWATCH_FLUSH_INTERVAL", "0.06")  # other settings: a new emitter, which starts again
    client.setLevel(logging.INFO)  # the user's choice is kept
    other = Experiment(Workspace.from_config(), unique_name()).start_logging()
    other.log("x", 1.0)
    assert other.flush(10) and other.emitter is not run.emitter
    assert client.level == logging.INFO


def test_offline_run_waits_in_the_spool_then_syncs(sdk_settings, monkeypatch):
    from runwatch.producers.sync import sync_spools
    from runwatch import Run

    monkeypatch.delenv("RUNWATCH_RUN_ID", raising=False)
    run = Run.get_context()
    assert run.run_type == "offline"
    run.log("offline metric", 1.5)
    run.complete()
    assert run.emitter.stats.events_sent == 0
    from runwatch.producers.emitter import close_all

    close_all(5)
    result = sync_spools(sdk_settings)
    assert result["events"] >= 3 and result["spools"] == 1
    msgs = consume(sdk_settings.bootstrap_servers, [sdk_settings.topic("metrics")],
                   lambda got: len(metric_points(decoded(got))) >= 1)
    assert metric_points(decoded(msgs), run.id) == [(run.id, "offline metric", "scalar", "", "float", 0, 1.5)]
    assert not list((sdk_settings.home / "spool").iterdir())


def test_error_in_background_never_reaches_training(sdk_settings):
    run = Experiment(Workspace.from_config(), unique_name()).start_logging()
    em = run.emitter
    em.names.append(("bogus",))  # a corrupt name entry the packer cannot use
    em.buffer.num.append((len(em.names) - 1, 0, 0.0, 1.0))
    run.log("fine", 1.0)
    wait_until(lambda: em.stats.background_errors >= 1, 10, what="the error counted")
    run.log("still fine", 2.0)  # the training loop carries on

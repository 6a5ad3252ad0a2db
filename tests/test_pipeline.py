"""End to end on the embedded default: SDK -> broker -> Faust processors -> ClickHouse sink -> read API."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from conftest import ROOT, Worker, log_rows_table_tags, point_sdk_at, produce, unique_name, wait_until
from runwatch import Experiment, Run, Workspace
from runwatch.core.events import MetricBatch, MetricName, RunCreated, RunStatus, encode, make_envelope, this_source


def visible(worker, run_id, status=None, metric=None, count=None):
    """Wait until the run (and optionally a status / a metric's point count) is visible through the API."""
    def check():
        r = worker.get(f"/api/runs/{run_id}")
        if status and r["status"] != status:
            return False
        if metric:
            m = worker.get(f"/api/runs/{run_id}/metrics", name=metric).get(metric)
            n = 0 if m is None else len(m) if isinstance(m, (list, dict)) else 1
            if isinstance(m, dict):
                n = len(next(iter(m.values())))
            if n != count:
                return False
        return r
    return wait_until(check, 30, 0.1, what=f"run {run_id} visible")


def cli(worker, *args):
    out = subprocess.run([sys.executable, "-m", "runwatch.cli", *args, "--json"], capture_output=True, text=True,
                         env=worker.env(), cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_round_trip_every_value(stack_env):
    worker = stack_env
    ws = Workspace.from_config()
    exp = Experiment(ws, unique_name())
    run = exp.start_logging(display_name="baseline")
    losses = [1.0 / (i + 1) for i in range(500)]
    for v in losses:
        run.log("loss", v)
    run.log("Category", "Red")
    run.log("flag", False)
    run.log("epochs", 7)
    run.log_list("fibonacci", [0, 1, 1, 2, 3, 5])
    log_rows_table_tags(run)
    with run.child_run(name="fold-1") as child:
        child.log("acc", 0.91)
        with child.child_run(name="inner") as grandchild:
            grandchild.log("depth", 2)
    run.complete()
    visible(worker, run.id, status="Completed", metric="loss", count=500)
    visible(worker, grandchild.id, status="Completed", metric="depth", count=1)

    expected = {
        "loss": losses, "Category": "Red", "flag": False, "epochs": 7, "fibonacci": [0, 1, 1, 2, 3, 5],
        "cosine wave": {"angle": [0.5, 1.0], "cos": [float(np.cos(0.5)), float(np.cos(1.0))]},
        "sine wave": {"angle": [0.0, 0.5], "sine": [0.0, 0.479]},
    }
    assert run.get_metrics() == expected
    assert worker.get(f"/api/runs/{run.id}/metrics") == expected
    assert cli(worker, "metrics", run.id) == expected
    assert run.get_metrics(name="loss") == {"loss": losses}
    assert run.get_metrics(recursive=True) == {run.id: expected, child.id: {"acc": 0.91},
                                               grandchild.id: {"depth": 2}}
    assert type(run.get_metrics()["epochs"]) is int and type(run.get_metrics()["flag"]) is bool

    details = run.get_details()
    assert details["status"] == "Completed" and details["displayName"] == "baseline"
    assert details["tags"] == {"optimizer": "adam", "worth another look": None}
    assert details["properties"] == {"author": "me"}
    assert details["startTimeUtc"] <= details["endTimeUtc"] and details["durationSeconds"] >= 0
    assert run.get_status() == "Completed"
    assert run.get_tags() == {"optimizer": "adam", "worth another look": None}
    assert run.get_properties() == {"author": "me"}
    assert [c.id for c in run.get_children()] == [child.id]
    assert [c.id for c in run.get_children(recursive=True)] == [child.id, grandchild.id]
    assert [r.id for r in exp.get_runs()] == [run.id]
    assert {r.id for r in exp.get_runs(include_children=True)} == {run.id, child.id, grandchild.id}
    assert [r.id for r in exp.get_runs(tags={"optimizer": "adam"})] == [run.id]
    assert [r.id for r in exp.get_runs(tags="worth another look")] == [run.id]
    assert exp.get_runs(tags={"optimizer": "sgd"}) == []
    assert [r.id for r in exp.get_runs(properties={"author": "me"})] == [run.id]

    reopened = Run(exp, run.id)
    assert reopened.get_status() == "Completed" and reopened.get_tags() == run.get_tags()
    shown = cli(worker, "runs", "show", run.id)
    assert shown["status"] == "Completed" and [c["run_id"] for c in shown["children"]] == [child.id]
    assert [h["to"] for h in shown["history"]] == ["Running", "Completed"]
    listed = cli(worker, "runs", "list", "--experiment", exp.name)
    assert [r["run_id"] for r in listed] == [run.id]
    exps = {e["name"]: e for e in cli(worker, "experiments")}
    assert exps[exp.name]["runs"] == 1 and exps[exp.name]["by_status"] == {"Completed": 1}


def test_aggregates_equal_numpy(stack_env):
    worker = stack_env
    exp = Experiment(Workspace.from_config(), unique_name())
    rng = np.random.default_rng(7)
    values = {}
    runs = []
    for k in range(3):
        run = exp.start_logging()
        v = rng.normal(size=3000)
        v[::97] = np.nan
        values[run.id] = v
        for i, x in enumerate(v):
            run.log("x", float(x))
            if i % 1000 == 999:
                run.flush()  # several batches per run: the running aggregates must fold them
        run.complete()
        runs.append(run)
    for run in runs:
        visible(worker, run.id, status="Completed", metric="x", count=3000)

    def aggs_ready():
        rows = worker.get("/api/runs", experiment=exp.name, metric="x")
        return rows if all(r["metrics"].get("x", {}).get("count") == 3000 for r in rows) and len(rows) == 3 else None

    rows = wait_until(aggs_ready, 30, what="aggregates")
    for r in rows:
        v, m = values[r["run_id"]], r["metrics"]["x"]
        assert m["count"] == len(v)
        assert m["min"] == np.nanmin(v) and m["max"] == np.nanmax(v)
        assert np.array_equal([m["first"], m["last"]], [v[0], v[-1]], equal_nan=True)  # v[0] is NaN
        assert m["last_step"] == len(v) - 1
    # "find the run with the lowest minimum": sorted through the API, the CLI and by numpy
    by_numpy = sorted(values, key=lambda rid: np.nanmin(values[rid]))
    api_sorted = worker.get("/api/runs", experiment=exp.name, sort_metric="x", sort="min", order="asc")
    assert [r["run_id"] for r in api_sorted] == by_numpy
    # the sort metric's aggregates come with the sorted runs (one query): the same as listed unsorted
    assert {r["run_id"]: r["metrics"] for r in api_sorted} == {r["run_id"]: r["metrics"] for r in rows}
    cli_sorted = cli(worker, "runs", "list", "--experiment", exp.name, "--metric", "x", "--sort", "min")
    assert [r["run_id"] for r in cli_sorted] == by_numpy
    desc = worker.get("/api/runs", experiment=exp.name, sort_metric="x", sort="max", order="desc")
    assert [r["run_id"] for r in desc] == sorted(values, key=lambda rid: -np.nanmax(values[rid]))


def _produce(worker, topic_suffix, messages):
    produce(worker.broker.bootstrap, worker.prefix + topic_suffix, messages)


def test_replayed_batch_stores_nothing_twice(stack_env):
    worker = stack_env
    run_id = unique_name("replay")
    src = this_source()
    created = make_envelope(run_id, "replays", RunCreated(created_ts=1_700_000_000.0), seq=0, source=src)
    names = [MetricName(name="m", kind="scalar", column="", dtype="float")]
    batch = MetricBatch.from_arrays(names, np.zeros(100), np.arange(100), np.arange(100) * 1000 + 1_700_000_000_000_000,
                                    np.arange(100, dtype=float))
    raw = encode(make_envelope(run_id, "replays", batch, seq=1, source=src))
    later = make_envelope(run_id, "replays", MetricBatch.from_arrays(names, [0], [100], [1_700_000_000_000_000], [9.0]),
                          seq=2, source=src)
    _produce(worker, "runs", [(run_id.encode(), encode(created))])
    _produce(worker, "metrics", [(run_id.encode(), raw)] * 3 + [(run_id.encode(), encode(later))])  # 3 times the same
    visible(worker, run_id, metric="m", count=101)
    assert worker.get(f"/api/runs/{run_id}/metrics")["m"] == [float(i) for i in range(100)] + [9.0]
    agg = wait_until(lambda: _agg(worker, run_id, "m", 101), 30, what="aggregate")
    assert agg["count"] == 101 and agg["max"] == 99.0  # the processors also counted the batch once
    assert worker.health()["sink"]["repeats_dropped"] >= 2


def _agg(worker, run_id, name, count):
    rows = worker.get("/api/runs", include_children="true", metric=name, limit=100000)
    for r in rows:
        if r["run_id"] == run_id and r["metrics"].get(name, {}).get("count") == count:
            return r["metrics"][name]
    return None


def test_illegal_transition_is_reported_not_applied(stack_env):
    worker = stack_env
    run = Experiment(Workspace.from_config(), unique_name()).start_logging()
    run.complete()
    run._set_status(RunStatus.Running)  # a late "Running" after Completed
    run.flush()
    r = wait_until(lambda: (lambda x: x if x["illegal_transitions"] == 1 else None)(worker.get(f"/api/runs/{run.id}")),
                   30, what="illegal transition recorded")
    assert r["status"] == "Completed"
    # the record shows the runs topic at once (the run tail); the history is what is stored
    history = wait_until(lambda: (lambda h: h if len(h) == 3 else None)(worker.get(f"/api/runs/{run.id}/history")),
                         30, what="the history stored")
    assert [(h["to"], h["applied"]) for h in history] == [("Running", True), ("Completed", True), ("Running", False)]
    assert "Completed is final" in history[-1]["reason"]


def test_failed_run_records_error_and_alert(stack_env):
    worker = stack_env
    exp = Experiment(Workspace.from_config(), unique_name())
    with pytest.raises(ZeroDivisionError):
        with exp.start_logging() as run:
            run.log("before", 1.0)
            1 / 0
    r = visible(worker, run.id, status="Failed")
    assert "ZeroDivisionError" in r["error"]["message"]
    assert run.get_details()["error"]["message"].startswith("ZeroDivisionError")
    health = worker.health()
    assert health["rows"]["alerts"] >= 1


HOSTILE = ["x' OR 'a' LIKE '%", "'; DROP TABLE runwatch.runs; --", "\\' \" ` {x:String} $1 %s", "名前 ✓", "a\nb\tc"]


def test_hostile_strings_do_no_harm(stack_env):
    worker = stack_env
    exp = Experiment(Workspace.from_config(), unique_name())
    run = exp.start_logging(display_name=HOSTILE[1])
    for i, s in enumerate(HOSTILE):
        run.log(s, float(i))
        run.tag(s, s)
        run.tag(f"k{i}", s)
    # properties come back as ClickHouse's JSON text of the map (runwatch/api/queries.py): hostile keys and values too
    run.add_properties({**{f"p{s}": s for s in HOSTILE}, "ctl": "\x00\x1f\u2028\\/"})
    run.log("text", HOSTILE[0])
    run.complete()
    visible(worker, run.id, status="Completed", metric="text", count=1)
    m = run.get_metrics()
    assert m == {**{s: float(i) for i, s in enumerate(HOSTILE)}, "text": HOSTILE[0]}
    assert run.get_tags() == {**{s: s for s in HOSTILE}, **{f"k{i}": s for i, s in enumerate(HOSTILE)}}
    assert run.get_properties() == {**{f"p{s}": s for s in HOSTILE}, "ctl": "\x00\x1f\u2028\\/"}
    listed = worker.get("/api/runs", experiment=exp.name, sort_metric=HOSTILE[2], metric=HOSTILE[3])
    # the read API stores and gives every property, runwatch's own (`_runwatch.*`) too; the SDK leaves those out
    assert [{k: v for k, v in r["properties"].items() if not k.startswith("_runwatch.")} for r in listed] == [
        run.get_properties()]
    for i, s in enumerate(HOSTILE):
        assert worker.get("/api/runs", experiment=s) == []
        # NAME=VALUE splits at the first '=': hostile values after a plain name, hostile names alone
        assert [r["run_id"] for r in worker.get("/api/runs", experiment=exp.name, tag=f"k{i}={s}")] == [run.id]
        assert [r["run_id"] for r in worker.get("/api/runs", experiment=exp.name, tag=s)] == [run.id]
        assert worker.get("/api/runs", experiment=exp.name, tag=f"k{i}={s}x") == []
        assert worker.get(f"/api/runs/{run.id}/metrics", name=s) == {s: float(i)}
        got = worker.get("/api/runs", experiment=exp.name, sort_metric=s, sort="max")
        assert [r["run_id"] for r in got] == [run.id]
    import httpx

    bad = httpx.get(f"{worker.api_url}/api/runs", params={"sort": "max; DROP TABLE x", "sort_metric": "a"})
    assert bad.status_code == 400 and "sort must be one of" in bad.json()["error"]
    assert httpx.get(f"{worker.api_url}/api/runs/{HOSTILE[1]}").status_code == 404
    # the metrics of an unknown run: a 404 too (the run is looked up only when no points are found)
    for recursive in ("false", "true"):
        r = httpx.get(f"{worker.api_url}/api/runs/{HOSTILE[1]}/metrics", params={"recursive": recursive})
        assert r.status_code == 404 and "no run" in r.json()["error"]
    assert worker.get(f"/api/runs/{run.id}/metrics", name="never logged") == {}  # a known run, no such metric
    assert worker.get(f"/api/runs/{run.id}/metrics", name="never logged", recursive="true") == {run.id: {}}
    assert worker.health()["rows"]["runs"] >= 1  # the table is still there


def test_malformed_events_go_to_the_dead_letters(stack_env):
    worker = stack_env
    before = worker.health()
    _produce(worker, "metrics", [(b"junk", b"\x00\x01 not msgpack"), (b"junk2", b"\x81\xa1v\x63")])
    _produce(worker, "runs", [(b"junk3", b"\x93\x01\x02\x03")])
    health = wait_until(lambda: (lambda h: h if h["rows"]["dead_letters"] >= before["rows"]["dead_letters"] + 3 else None)(
        worker.health()), 30, what="dead letters stored")
    assert health["processors"]["dead_letters"] >= before["processors"]["dead_letters"] + 3
    # the worker still takes good events
    run = Experiment(Workspace.from_config(), unique_name()).start_logging()
    run.log("after junk", 1.0)
    run.complete()
    visible(worker, run.id, status="Completed", metric="after junk", count=1)


def log_series(run, flushes: int, per_flush: int, after_flush) -> int:
    """Log 0, 1, 2, ... as metric `x`, `per_flush` points at a time, flushing each time and then calling
    `after_flush(i)`; the number of points logged."""
    total = 0
    for i in range(flushes):
        for _ in range(per_flush):
            run.log("x", float(total))
            total += 1
        run.flush()
        after_flush(i)
    return total


def test_worker_killed_mid_stream_loses_nothing(broker, tmp_path, monkeypatch):
    w = Worker(broker, tmp_path / "wk", f"kill{tmp_path.name[-6:]}.").start()
    point_sdk_at(monkeypatch, w, tmp_path / "sdk", flush_interval="0.02")
    try:
        exp = Experiment(Workspace.from_config(), unique_name())
        run = exp.start_logging()
        # SIGKILL while batches are in flight
        total = log_series(run, 40, 5000, lambda flush: w.kill() if flush == 20 else None)
        run.complete()
        w2 = Worker(broker, w.home, w.prefix)
        w2.api_port = w.api_port
        w2.start()
        try:
            visible(w2, run.id, status="Completed", metric="x", count=total)
            values = run.get_metrics(name="x")["x"]
            assert values == [float(i) for i in range(total)]  # nothing lost, nothing twice
            # and so it is in ClickHouse, not only in the read API's live tail
            assert wait_until(lambda: w2.get(f"/api/runs/{run.id}/metrics", name="x", stored="true").get("x") == values,
                              30, what="every point stored")
            # after a SIGKILL Faust may skip batches (docs/architecture.md, Dependencies: at least once with possible skips); once the
            # run has finished, the sink checks the aggregates against the stored points and recomputes a shortfall
            agg = wait_until(lambda: (a := w2.get(f"/api/runs/{run.id}/aggregates").get("x")) and a["count"] == total
                             and a, 30, what="the aggregate complete")
            assert (agg["min"], agg["max"], agg["last"]) == (0.0, total - 1, total - 1)
        finally:
            w2.stop()
    finally:
        from runwatch.producers.emitter import close_all

        close_all(5)
        w.stop()


def test_a_chunk_failing_after_its_inserts_is_written_again_once(broker, tmp_path, monkeypatch):
    """A chunk fails after its inserts, before its offset commit (here: once, the 3rd chunk, by a test hook;
    in use: a check of an insert, or ClickHouse failing between two tables of a chunk). The retry writes
    exactly that chunk's ranges again with the same tokens while training goes on: every point is stored
    once, none twice, even though the next fetch would have cut the range elsewhere."""
    w = Worker(broker, tmp_path / "wk", f"fail{tmp_path.name[-6:]}.",
               {"RUNWATCH_TEST_FAULT": "fail-after-insert:3"}).start()
    point_sdk_at(monkeypatch, w, tmp_path / "sdk")
    try:
        run = Experiment(Workspace.from_config(), unique_name()).start_logging()
        # the sink fetches a few events at a time: many chunks, the retried one among them
        total = log_series(run, 30, 2000, lambda flush: time.sleep(0.05))
        run.complete()
        visible(w, run.id, status="Completed", metric="x", count=total)
        stored = wait_until(lambda: (v := w.get(f"/api/runs/{run.id}/metrics", name="x", stored="true").get("x"))
                            and len(v) >= total and v, 30, what="every point stored")
        assert stored == [float(i) for i in range(total)]  # nothing lost, nothing twice
        assert w.health()["sink"]["retries"] >= 1
    finally:
        from runwatch.producers.emitter import close_all

        close_all(5)
        w.stop()


def test_live_tail_shows_unstored_points_within_its_bound_and_lets_go(broker, tmp_path, monkeypatch):
    """The read API's live tail (runwatch/api/live.py, docs/api.md) on a real worker whose inserts fail for a while:
    watched runs' points show from the broker, a run past the tail's bound shows its stored points alone (none
    yet), an unwatched run costs nothing, and once stored every point shows exactly once."""
    down = tmp_path / "clickhouse-down"
    down.write_text("")
    w = Worker(broker, tmp_path / "wk", f"live{tmp_path.name[-6:]}.", {
        "RUNWATCH_TEST_FAULT": f"clickhouse-down-while:{down}", "RUNWATCH_LIVE_MAX_POINTS": "300",
        "RUNWATCH_LIVE_WATCH_SECONDS": "2"}).start()
    point_sdk_at(monkeypatch, w, tmp_path / "sdk")

    def read(run_id, **params):
        r = httpx.get(f"{w.api_url}/api/runs/{run_id}/metrics", params=dict(name="x", **params), timeout=30)
        return r.json().get("x") if r.status_code == 200 else r.status_code

    try:
        exp = Experiment(Workspace.from_config(), unique_name())
        a, b = exp.start_logging(), exp.start_logging()
        for run, n in ((a, 200), (b, 150)):
            for i in range(n):
                run.log("x", float(i))
            run.flush()
        want_a, want_b = [float(i) for i in range(200)], [float(i) for i in range(150)]
        assert wait_until(lambda: read(a.id) == want_a, 30, what="run a from the live tail")
        assert read(a.id, stored="true") == 404  # nothing stored, not even the run
        assert w.health()["live"]["held_points"] == 200
        # b's 150 points would take the tail past its 300: b shows what is stored (no points; the run itself is
        # known from the runs topic, the run tail)
        wait_until(lambda: read(b.id) is None and w.health()["live"]["overflows"] == 1, 30, what="the tail refusing b")
        assert read(b.id) is None and w.health()["live"]["held_points"] == 200
        # no reads for 2 s: nothing is watched, nothing held
        live = wait_until(lambda: (h := w.health()["live"])["watched"] == 0 and h, 30, what="the watches ending")
        assert live["held_points"] == 0
        down.unlink()
        for run, want in ((a, want_a), (b, want_b)):
            assert wait_until(lambda: read(run.id, stored="true") == want, 60, what="stored")
            assert read(run.id) == want  # stored and tail together: once each
    finally:
        from runwatch.producers.emitter import close_all

        close_all(5)
        w.stop()

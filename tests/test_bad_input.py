"""Bad input through the public SDK, the broker and the read API, on the real embedded stack (Tansu, a real
worker, chDB): every value the SDK accepts is stored and read back exactly, or refused at the call with the
SDK's own error naming the argument and the limit; no event, however large or odd, crashes a stage or
stalls a stream (it becomes a dead letter with its reason, and the worker goes on). Figures go to
test-output/bad_input.{json,md} (docs/reliability.md, "Bad input").
"""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from conftest import consume, produce, unique_name, wait_until
from figures import Figures
from runwatch import Experiment, MetricError, MetricTypeError, Workspace
from runwatch.core.errors import FileError, NotFound
from runwatch.core.events import (LogBatch, MetricAggregates, MetricBatch, MetricName, PropertiesSet, RunCreated,
                                  RunState, TagsSet, decode, encode, make_envelope, this_source)

FIGURES = Figures("bad_input", "tests/test_bad_input.py")


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    FIGURES.write()


def healthy(worker) -> None:
    """The worker goes on: a normal run logged now is stored whole."""
    run = Experiment(Workspace.from_config(), unique_name("after")).start_logging()
    for i in range(100):
        run.log("ok", float(i))
    run.complete()
    assert worker.proc.poll() is None, "the worker died"
    wait_until(lambda: len(run.get_metrics(name="ok").get("ok", [])) == 100 and run.get_status() == "Completed",
               30, what="a normal run after the bad input")


def dead_letters(worker) -> int:
    h = worker.health()
    return h["processors"]["dead_letters"] + h["sink"]["dead_letters"]


def raw_event(run_id: str, payload, seq: int = 0) -> bytes:
    return encode(make_envelope(run_id, "bad", payload, seq, source=this_source()))


# ------------------------------------------------------------------------------ at the call
def test_tags_and_properties_past_their_limits_are_refused_at_the_call(stack_env):
    run = Experiment(Workspace.from_config(), unique_name("big")).start_logging()
    with pytest.raises(MetricError, match=r"tag 'huge' is 1,040,000 characters long; at most 32,768 "
                                          r"\(setting max_tag_value_length\)"):
        run.tag("huge", "x" * 1_040_000)
    with pytest.raises(MetricError, match=r"property 'p' is 1,100,000 characters long; at most 32,768"):
        run.add_properties({"p": "x" * 1_100_000})
    with pytest.raises(MetricError, match=r"the run would have 10,001 tags; at most 10,000 \(setting max_tags\)"):
        run.set_tags({f"t{i}": "x" for i in range(10_001)})
    with pytest.raises(MetricError, match=r"tags and properties would be 1,04\d,\d{3} characters in all; at most 262,144"):
        run.set_tags({f"t{i}": "x" * 100 for i in range(10_000)})
    with pytest.raises(MetricError, match=r"tags and properties would be [\d,]+ characters in all; at most 262,144"):
        run.set_tags({f"t{i}": "x" * 30_000 for i in range(9)})
    run.set_tags({f"t{i}": "x" * 100 for i in range(1000)})  # at the limit: taken, and stored exactly
    run.complete()
    wait_until(lambda: len(run.get_tags()) == 1000, 30, what="1,000 tags stored")
    assert run.get_tags() == {f"t{i}": "x" * 100 for i in range(1000)}
    FIGURES.record("tags and properties over their limits (a 1,040,000-character tag, a 1,100,000-character "
                   "property, 10,001 tags, 10,000 tags of 100 characters in one call)",
                   note="5 refused at the call with MetricError naming the setting; 1,000 tags of 100 characters "
                   "stored exactly")


def test_text_that_cannot_be_stored_is_refused_at_the_call(stack_env):
    run = Experiment(Workspace.from_config(), unique_name("surrogate")).start_logging()
    calls = [lambda: run.log("bad\ud800name", 1.0), lambda: run.log("note", "a\ud800b"),
             lambda: run.tag("k", "\udfff"), lambda: run.add_properties({"p": "x\ud83d"}),
             lambda: run.log_row("t", x="\ud800"), lambda: run.log_list("l", ["ok", "\ud800"])]
    for call in calls:
        with pytest.raises(MetricError, match="cannot be stored: surrogates not allowed"):
            call()
    run.log("note", "fine ✓")
    assert run.flush(10)
    run.complete()
    wait_until(lambda: run.get_metrics() == {"note": "fine ✓"}, 30, what="the run's one good value")
    assert run.get_details()["droppedPoints"] == 0
    FIGURES.record("lone surrogates in a name, a string value, a tag, a property, a row, a list",
                   note=f"{len(calls)} refused at the call (MetricError); nothing lost after them; droppedPoints 0")


def test_numbers_are_stored_exactly_or_refused(stack_env):
    run = Experiment(Workspace.from_config(), unique_name("ints")).start_logging()
    edge = 2 ** 53
    run.log("big", edge)
    run.log("big", -edge)
    run.log("u", np.uint64(edge))
    run.log("step", 1.0, step=edge)
    refused = {
        "run.log: value 9007199254740993 is outside ±9,007,199,254,740,992": lambda: run.log("big", edge + 1),
        "run.log: value 18446744073709551615 is outside": lambda: run.log("u", np.uint64(2 ** 64 - 1)),
        "run.log: step 9223372036854775808 is outside": lambda: run.log("step", 1.0, step=2 ** 63),
        "does not fit a float64|is outside": lambda: run.log("huge", 10 ** 400),
        "run.log_list: value holds 9007199254740993": lambda: run.log_list("arr", np.array([0, edge + 1])),
    }
    for message, call in refused.items():
        with pytest.raises(MetricError, match=message):
            call()
    with pytest.raises(MetricTypeError, match=r"run.log_table: column names must be strings, not int \(1\)"):
        run.log_table("t", {1: [1], "1": [2]})
    run.log_table("t", {"a": [1, 2], "b": [3, 4]})
    with pytest.raises(MetricError, match=r"table 't' has columns \['a', 'b'\]; these are \['a', 'c'\]"):
        run.log_table("t", {"a": [5], "c": [6]})
    run.log_table("t", {"b": [7], "a": [8]})  # the same columns again: more rows
    run.complete()
    got = wait_until(lambda: m if len((m := run.get_metrics()).get("t", {}).get("a", [])) == 3 else None, 30,
                     what="the values stored")
    assert got["big"] == [edge, -edge] and all(type(v) is int for v in got["big"])
    assert got["u"] == edge and got["step"] == 1.0
    assert got["t"] == {"a": [1, 2, 8], "b": [3, 4, 7]}
    FIGURES.record("integers past 2**53, steps past int64, 10**400, non-string table columns, a table's columns "
                   "changed", note=f"{len(refused) + 2} refused at the call; ±2**53 and np.uint64(2**53) stored "
                   "and read back as exact ints")


# ------------------------------------------------------------------------------ through the broker
def test_a_state_too_large_for_a_message_is_dead_lettered_and_the_worker_goes_on(stack_env):
    """What the SDK refuses can still come from elsewhere: a tag set the size of a message went straight to
    the broker crashed the worker, and every later start again. Now the processors refuse it before it
    changes anything."""
    worker = stack_env
    run_id = unique_name("huge-state")
    before = dead_letters(worker)
    produce(worker.broker.bootstrap, worker.prefix + "runs", [
        (run_id.encode(), raw_event(run_id, RunCreated(created_ts=time.time()), 0)),
        (run_id.encode(), raw_event(run_id, TagsSet(tags={"huge": "x" * 2_000_000}), 1)),
        (run_id.encode(), raw_event(run_id, TagsSet(tags={f"t{i}": "y" * 100 for i in range(10_000)}), 2)),
        (run_id.encode(), raw_event(run_id, PropertiesSet(properties={"p": "z" * 1_100_000}), 3)),
        (run_id.encode(), raw_event(run_id, TagsSet(tags={"small": "fine"}), 4))])
    wait_until(lambda: dead_letters(worker) >= before + 2, 30, what="dead letters")
    assert worker.proc.poll() is None
    wait_until(lambda: worker.get(f"/api/runs/{run_id}")["tags"].get("small") == "fine", 30, what="the good tag")
    tags = worker.get(f"/api/runs/{run_id}")["tags"]
    assert "huge" not in tags
    reasons = [r["reason"] for r in worker.get("/api/dead-letters", run_id=run_id)]
    assert any("would be 2,000,004 characters; at most 1,048,576" in r for r in reasons), reasons
    healthy(worker)
    FIGURES.record("a run state past one message (a 2,000,000-character tag, 10,000 tags, a 1,100,000-character "
                   "property) sent straight to the broker", note=f"{dead_letters(worker) - before} dead-lettered with "
                   "the reason; later tags applied; 0 crashes")


def test_a_decodable_event_the_store_cannot_take_is_a_dead_letter_not_a_poison_pill(stack_env):
    worker = stack_env
    run_id = unique_name("poison")
    snapshot = {"run_id": run_id, "experiment": "bad", "status": "Failed", "error": {"message": b"bytes, not text"},
                "version": 1}
    before = worker.health()["sink"]["data_errors"]
    produce(worker.broker.bootstrap, worker.prefix + "aggregates", [
        (run_id.encode(), raw_event(run_id, RunState(version=1, snapshot=snapshot))),
        (run_id.encode(), raw_event(run_id, MetricAggregates(source_event="e", rows=[{"name": 3}]))),
        (run_id.encode(), raw_event(run_id, RunState(version=2, snapshot={"status": "Sleeping"})))])
    wait_until(lambda: worker.health()["sink"]["data_errors"] >= before + 3, 30, what="data errors dead-lettered")
    reasons = [r["reason"] for r in worker.get("/api/dead-letters", run_id=run_id)]
    assert any("run_state error: not JSON" in r for r in reasons)
    assert any("aggregates row 0: no 'column'" in r or "aggregates row 0 name" in r for r in reasons)
    assert any("'Sleeping' is not a run state" in r for r in reasons)
    healthy(worker)
    FIGURES.record("decodable events the store cannot take (bytes in a run's error, a malformed aggregates row, "
                   "an unknown status)", note="3 dead-lettered by the sink with the field named; the stream went on")


def test_log_file_names_from_the_broker_are_checked(stack_env):
    worker = stack_env
    run_id = unique_name("traversal")
    ts = np.zeros(1, "<i8").tobytes()
    produce(worker.broker.bootstrap, worker.prefix + "logs", [
        (run_id.encode(), raw_event(run_id, LogBatch(file="../../../../api/runs/RUN/files/model.txt", first_seq=0,
                                                     ts=ts, lines=["x"]))),
        (run_id.encode(), raw_event(run_id, LogBatch(file="azureml-logs/ok.txt", first_seq=0, ts=ts, lines=["y"]), 1))])
    reasons = wait_until(lambda: [r["reason"] for r in worker.get("/api/dead-letters", run_id=run_id)] or None, 30,
                         what="the dead letter")
    assert any("logs: file: file name '../../../../api/runs/RUN/files/model.txt' contains '..'" in r for r in reasons)
    FIGURES.record("a log file named ../../../../api/runs/RUN/files/model.txt", note="dead-lettered by the sink; "
                   "downloads refuse any name that would leave the target directory")


@st.composite
def wrong_events(draw):
    """Decodable events of every kind with wrong (but well-typed for the envelope) contents, and oversized ones."""
    run_id = "hyp-" + draw(st.text("abcdef0123456789", min_size=6, max_size=6))
    wire = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text(max_size=8)
                        | st.binary(max_size=8), lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
    kind = draw(st.sampled_from(["state", "aggregates", "logs", "tags", "huge-tags", "metrics-times"]))
    if kind == "state":
        snap = draw(st.dictionaries(st.sampled_from(["status", "tags", "properties", "created_ts", "error", "version",
                                                      "dropped_points", "display_name", "seen"]), wire, max_size=5))
        return "aggregates", run_id, RunState(version=draw(st.integers(0, 2**63)), snapshot=snap)
    if kind == "aggregates":
        return "aggregates", run_id, MetricAggregates(source_event="h", rows=[draw(st.dictionaries(st.sampled_from(
            ["name", "column", "kind", "count", "min", "last_ts", "version"]), wire, max_size=7))])
    if kind == "logs":
        name = draw(st.sampled_from(["../x", "/abs", "a/../../b", "", "ok.txt", "a\x00b", "C:\\x"]))
        return "logs", run_id, LogBatch(file=name or "x", first_seq=draw(st.integers(0, 2**40)),
                                        ts=np.array([draw(st.integers(-2**63, 2**63 - 1))], "<i8").tobytes(), lines=["l"])
    if kind == "tags":
        return "runs", run_id, TagsSet(tags=draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5) | st.none(),
                                                                 max_size=4)))
    if kind == "huge-tags":
        return "runs", run_id, TagsSet(tags={"h": "x" * draw(st.integers(1_100_000, 1_500_000))})
    names = [MetricName(name="m", kind="scalar", dtype="float")]
    t = draw(st.integers(-2**63, 2**63 - 1))
    return "metrics", run_id, MetricBatch.from_arrays(names, [0], [0], [t], [1.0])


def test_decodable_but_wrong_and_oversized_events_never_crash_a_stage(stack_env):
    worker = stack_env
    sent: list[tuple[str, bytes, bytes]] = []

    @hsettings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(wrong_events())
    def collect(event):
        topic, run_id, payload = event
        sent.append((topic, run_id.encode(), raw_event(run_id, payload, len(sent))))

    collect()
    for topic in ("runs", "metrics", "logs", "aggregates"):
        msgs = [(k, v) for t, k, v in sent if t == topic]
        if msgs:
            produce(worker.broker.bootstrap, worker.prefix + topic, msgs)
    healthy(worker)
    h = worker.health()
    assert worker.proc.poll() is None and h["processors"]["ready"] and h["sink"]["ready"] and not h["sink"]["error"]
    FIGURES.record(f"{len(sent)} decodable-but-wrong and oversized events (hypothesis, every topic)",
                   note=f"0 crashes; the sink dead-lettered {h['sink']['data_errors']} so far, the processors "
                        f"{h['processors']['dead_letters']}; a normal run after them stored whole")


# ------------------------------------------------------------------------------ files
def test_file_names_travel_encoded_and_are_stored_as_given(stack_env, tmp_path):
    run = Experiment(Workspace.from_config(), unique_name("names")).start_logging()
    names = ["model.txt", "model.txt#backup", "notes?.txt", "x%2Fy", "a b+c&d=e.txt", "ünï/cödé.bin"]
    for i, name in enumerate(names):
        run.upload_file(name, io.BytesIO(f"content {i}".encode()))
    assert sorted(run.get_file_names()) == sorted(names)
    for i, name in enumerate(names):
        out = tmp_path / f"out{i}"
        run.download_file(name, out)
        assert out.read_bytes() == f"content {i}".encode()
    for bad, why in (("a//b", "would be stored as 'a/b'"), ("./x", "would be stored as 'x'"),
                     ("dir/", "names no file|would be stored as 'dir'"), ("a\\b", "backslash")):
        with pytest.raises(FileError, match=why):
            run.upload_file(bad, io.BytesIO(b"x"))
    run.complete()
    FIGURES.record("file names with #, ?, %2F, spaces, +, &, =, non-ASCII; names a store would change",
                   note=f"{len(names)} stored and read back as given; 4 refused at the call (never changed)")


def test_the_read_api_refuses_what_it_does_not_serve(stack_env):
    worker = stack_env
    base = worker.api_url
    run = Experiment(Workspace.from_config(), unique_name("api")).start_logging()
    run.upload_file("page.html", io.BytesIO(b"<script>alert(1)</script>"))
    run.complete()
    wait_until(lambda: run.get_status() == "Completed", 30, what="run stored")
    # a page that rebinds its DNS to 127.0.0.1 sends its own Host: refused
    evil = httpx.get(f"{base}/api/runs", headers={"Host": "evil.example"})
    assert evil.status_code == 421 and "Host 'evil.example' is not one this read API serves" in evil.json()["error"]
    assert httpx.get(f"{base}/api/runs", headers={"Host": "localhost"}).status_code == 200
    ok = httpx.get(f"{base}/api/runs", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in {k.lower() for k in ok.headers}
    # uploads are served as what they are not: never as a page
    served = httpx.get(f"{base}/api/runs/{run.id}/files/page.html")
    assert served.headers["content-type"] == "application/octet-stream"
    assert served.headers["x-content-type-options"] == "nosniff" and "attachment" in served.headers["content-disposition"]
    # bad parameters: 400, with what is wrong
    for path, params, message in ((f"/api/runs/{run.id}/logs", {"file": "f", "tail": "-1"}, "tail must be"),
                                  (f"/api/runs/{run.id}/logs", {"file": "f", "limit": "x"}, "limit must be"),
                                  ("/api/runs", {"limit": "0"}, "limit must be")):
        r = httpx.get(base + path, params=params)
        assert r.status_code == 400 and message in r.json()["error"], (path, r.text)
    # an unknown run is a 404 of the same shape everywhere
    missing = "no-such-run"
    for path in ("", "/metrics", "/aggregates", "/children", "/history", "/files", "/files/x.txt", "/snapshot",
                 "/logs?file=azureml-logs/70_driver_log_0.txt"):
        r = httpx.get(f"{base}/api/runs/{missing}{path}")
        assert r.status_code == 404 and r.json() == {"error": f"no run {missing!r}", "code": 404}, (path, r.text)
    put = httpx.put(f"{base}/api/runs/{missing}/files/a.txt", content=b"x", headers={"X-Runwatch-Wait": "0"})
    assert put.status_code == 404 and not (worker.home / "files" / "runs" / missing).exists()
    with pytest.raises(NotFound):
        Workspace.from_config().read_api().get(f"/api/runs/{missing}/children")
    FIGURES.record("read API: a foreign Host, an Origin, an HTML upload, bad parameters, unknown runs, an upload "
                   "to a run that does not exist", note="421; no CORS header; served as octet-stream, nosniff, "
                   "attachment; 400 naming the parameter; 404 of one shape on 10 endpoints; no directory made")


def test_ten_thousand_tag_calls_cost_the_wire_what_changed(stack_env):
    worker = stack_env
    run = Experiment(Workspace.from_config(), unique_name("tags")).start_logging()
    t0 = time.monotonic()
    for i in range(10_000):
        run.tag(f"t{i}", "v")
    run.complete()
    stored = wait_until(lambda: t if len(t := Workspace.from_config().read_api().get(f"/api/runs/{run.id}")["tags"])
                        == 10_000 else None, 120, what="10,000 tags stored")
    seconds = round(time.monotonic() - t0, 2)
    assert stored == {f"t{i}": "v" for i in range(10_000)}
    runs_msgs = consume(worker.broker.bootstrap, [worker.prefix + "runs", worker.prefix + "aggregates"],
                        lambda got: False, timeout=3)
    mine = [(m.topic.rsplit(".", 1)[-1], len(m.value), decode(m.value)) for m in runs_msgs if m.key == run.id.encode()]
    tag_events = [n for topic, n, env in mine if topic == "runs" and env.kind == "tags"]
    states = [n for topic, n, env in mine if topic == "aggregates" and env.kind == "run_state"]
    final = states[-1]
    FIGURES.record("10,000 separate run.tag() calls", note=f"stored in {seconds} s; on the wire: {len(tag_events)} tag "
                   f"event(s), {sum(tag_events):,} bytes; {len(states)} run states, {sum(states):,} bytes "
                   f"({sum(states) / final:.1f}× the final state)")
    # one tag at a time would have written 10,000 states of a growing set: about 5,000x the final state
    assert sum(tag_events) < 20 * 10_000 * len("t9999") and sum(states) < 100 * final


def test_downloads_never_leave_their_directory(tmp_path):
    from runwatch.producers.files import target_in

    out = tmp_path / "out"
    assert target_in(out, "azureml-logs/70_driver_log_0.txt") == (out / "azureml-logs/70_driver_log_0.txt").resolve()
    for name in ("../../../../etc/passwd", "a/../../b", "/abs/path"):
        with pytest.raises(FileError, match="would be written outside"):
            target_in(out, name)
    link = tmp_path / "link"
    link.symlink_to(tmp_path.parent)
    with pytest.raises(FileError, match="would be written outside"):
        target_in(out, "../link/x")


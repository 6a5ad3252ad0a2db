"""The guarantees (docs/architecture.md) on Apache Kafka: faults, bad input, security, scale-out.

Each fault test sends numbered points (value = step) from a real training process, injects the
fault, and compares what was sent with what the read API gives back: missing = sent − distinct
stored, duplicates = stored − distinct stored. Figures go to test-output/reliability.{json,md}
(docs/reliability.md keeps the last run's table).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from conftest import ROOT, Worker, _unique, produce, unique_name, wait_until
from figures import Figures
from kafka_cluster import KafkaCluster, cluster as make_cluster
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.kafka

TRAINER = r"""
import json, os, sys, time
if os.environ.get("TRAINER_FSIZE"):  # a disk that fills: the kernel refuses writes past this size (EFBIG)
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(os.environ["TRAINER_FSIZE"]),) * 2)
from runwatch import Workspace, Experiment
steps, seconds, progress = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
run = Experiment(Workspace.from_config(), os.environ["BENCH_EXPERIMENT"]).start_logging()
def note(n):
    with open(progress + ".tmp", "w") as f:
        json.dump({"run_id": run.id, "logged": n}, f)
    os.replace(progress + ".tmp", progress)
note(0)
t0 = time.time()
for i in range(steps):
    run.log("x", float(i))
    if i % 500 == 499:
        note(i + 1)
        wait = t0 + seconds * (i + 1) / steps - time.time()
        if wait > 0:
            time.sleep(wait)
run.complete()
note(steps)
deadline = time.time() + float(os.environ.get("TRAINER_LINGER", "0"))
while time.time() < deadline:   # stay alive (heartbeats, spool drain) while the fault lasts
    time.sleep(0.2)
print("emitter:", run.emitter.stats, "connected:", run.emitter.connected, flush=True)
"""


FIGURES = Figures("reliability", "tests/test_reliability.py")


@pytest.fixture(scope="session", autouse=True)
def report():
    yield
    FIGURES.write()


def record(_label: str, what: str, **figures) -> None:
    """One row of docs/reliability.md; the rerun command names the test that measured it."""
    FIGURES.record(what, **figures)


# ------------------------------------------------------------------------------ infrastructure
class KafkaWorker(Worker):
    """A runwatch worker on the Kafka cluster (idempotent producers, replication from the cluster's size)."""

    def __init__(self, cluster: KafkaCluster, home: Path, prefix: str, extra: dict | None = None):
        rf = str(min(3, cluster.n))
        env = {"RUNWATCH_BROKER_KIND": "kafka", "RUNWATCH_REPLICATION_FACTOR": rf,
               "RUNWATCH_MIN_INSYNC_REPLICAS": str(min(2, cluster.n)), "RUNWATCH_REQUEST_TIMEOUT_MS": "5000"}
        env.update(extra or {})
        super().__init__(cluster, home, prefix, env)


@pytest.fixture
def kafka1(tmp_path):
    c = make_cluster(1, tmp_path / "kafka")
    yield c
    c.stop()


def sdk_env(cluster: KafkaCluster, worker: Worker, home: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
    env.update(RUNWATCH_HOME=str(home), RUNWATCH_BOOTSTRAP_SERVERS=cluster.bootstrap, RUNWATCH_BROKER_KIND="kafka",
               RUNWATCH_TOPIC_PREFIX=worker.prefix, RUNWATCH_API_URL=worker.api_url, RUNWATCH_FLUSH_INTERVAL="0.05",
               RUNWATCH_REQUEST_TIMEOUT_MS="3000", RUNWATCH_REPLICATION_FACTOR=str(min(3, cluster.n)),
               RUNWATCH_MIN_INSYNC_REPLICAS=str(min(2, cluster.n)), RUNWATCH_HEARTBEAT_INTERVAL="0.5",
               BENCH_EXPERIMENT=unique_name("rel"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Trainer:
    """A training process logging `steps` numbered points over `seconds`."""

    def __init__(self, env: dict, tmp: Path, steps: int, seconds: float):
        self.progress = tmp / f"progress-{time.monotonic_ns()}.json"
        self.steps = steps
        self.proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(steps), str(seconds), str(self.progress)],
                                     env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def state(self) -> dict:
        try:
            return json.loads(self.progress.read_text())
        except (OSError, ValueError):
            return {}

    def logged(self) -> int:
        return self.state().get("logged", 0)

    @property
    def run_id(self) -> str:
        return wait_until(lambda: self.state().get("run_id"), 30, what="trainer started")

    def wait(self, timeout: float = 120) -> None:
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, out.decode()[-3000:]


def stored_values(worker: Worker, run_id: str, name: str = "x", stored: bool = True) -> list[float]:
    """A metric's values as the read API gives them back ([] while the run is not there yet): what is stored,
    or (stored=False) as a widget sees them, with the live tail's points not stored yet."""
    try:
        r = httpx.get(f"{worker.api_url}/api/runs/{run_id}/metrics",
                      params={"name": name, "stored": str(stored).lower()}, timeout=30)
    except httpx.HTTPError:
        return []
    if r.status_code != 200:
        return []
    v = r.json().get(name, [])
    return v if isinstance(v, list) else [v]


def account(worker: Worker, run_id: str, sent: int, timeout: float = 90) -> dict:
    """Wait until every sent point is stored (or `timeout`); then missing and duplicates."""
    t0 = time.monotonic()
    values: list[float] = []
    while time.monotonic() - t0 < timeout:
        values = stored_values(worker, run_id)
        if len(set(values)) >= sent:
            break
        time.sleep(0.25)
    distinct = set(values)
    assert distinct <= {float(i) for i in range(sent)}, "stored values that were never sent"
    return {"sent": sent, "stored": len(values), "missing": sent - len(distinct),
            "duplicates": len(values) - len(distinct), "recovery_s": round(time.monotonic() - t0, 2)}


def delivered(worker: Worker, trainer: "Trainer", sent: int, since: float) -> dict:
    """After a fault: the trainer finishes, every point is accounted for, recovery timed from `since`."""
    trainer.wait()
    fig = account(worker, trainer.run_id, sent)
    fig["recovery_s"] = round(time.monotonic() - since, 2)
    return fig


def processors_worker(cluster, home: Path, prefix: str, extra: dict) -> KafkaWorker:
    """A scale-out worker (worker_role=processors: no sink, no API, so nothing to wait for); started."""
    w = KafkaWorker(cluster, home, prefix, dict(extra, RUNWATCH_WORKER_ROLE="processors"))
    w.home.mkdir(parents=True, exist_ok=True)
    w.proc = subprocess.Popen([sys.executable, "-m", "runwatch.cli", "worker"], env=w.env(), cwd=ROOT,
                              stdout=open(w.home / "worker.log", "ab"), stderr=subprocess.STDOUT)
    return w


@contextlib.contextmanager
def training_under_way(cluster, tmp_path, sent: int, seconds: float, logged: int):
    """The cluster up, a worker, and a trainer sending `sent` points over `seconds` that has logged `logged`
    of them: the moment a fault test strikes. The worker is stopped at the end."""
    cluster.start()
    worker = start_worker(cluster, tmp_path)
    try:
        trainer = Trainer(sdk_env(cluster, worker, tmp_path / "sdk"), tmp_path, sent, seconds)
        wait_until(lambda: trainer.logged() >= logged, 30, what="training under way")
        yield worker, trainer
    finally:
        worker.stop()


def start_worker(cluster, tmp_path, prefix=None, **extra) -> KafkaWorker:
    return KafkaWorker(cluster, tmp_path / f"worker-{time.monotonic_ns()}", prefix or _unique("r"), extra).start(90)


# ------------------------------------------------------------------------------ faults
@pytest.mark.own_brokers
def test_broker_down_when_training_starts(kafka1, tmp_path):
    # the broker's and the worker's addresses are known before they run: training starts with neither there
    worker = KafkaWorker(kafka1, tmp_path / "w0", _unique("r"))
    trainer = Trainer(sdk_env(kafka1, worker, tmp_path / "sdk"), tmp_path, 20_000, 12.0)
    wait_until(lambda: trainer.logged() >= 3_000, 30, what="training under way with no broker")
    kafka1.start()
    t0 = time.monotonic()
    worker.start(90)
    try:
        fig = delivered(worker, trainer, 20_000, t0)
        record("broker_down_when_training", "broker down when training starts (spool, then sent)", **fig,
               note="recovery: broker start → all queryable")
        assert fig["missing"] == 0 and fig["duplicates"] == 0
    finally:
        worker.stop()


@pytest.mark.own_brokers
def test_broker_killed_and_restarted(kafka1, tmp_path):
    with training_under_way(kafka1, tmp_path, 30_000, 8.0, 8_000) as (worker, trainer):
        kafka1.kill(0)
        time.sleep(3)
        kafka1.start_node(0)
        t0 = time.monotonic()
        fig = delivered(worker, trainer, 30_000, t0)
        record("broker_killed", "broker SIGKILLed mid-stream, restarted after 3 s", **fig,
               note="recovery: restart → all queryable")
        assert fig["missing"] == 0 and fig["duplicates"] == 0


@pytest.mark.own_brokers
def test_broker_paused_longer_than_the_request_timeout(kafka1, tmp_path):
    with training_under_way(kafka1, tmp_path, 30_000, 8.0, 8_000) as (worker, trainer):
        kafka1.pause(0)
        time.sleep(7)  # the request timeout is 3 s on the SDK side, 5 s in the worker
        logged_during = trainer.logged()
        kafka1.resume(0)
        t0 = time.monotonic()
        fig = delivered(worker, trainer, 30_000, t0)
        record("broker_paused", "broker SIGSTOPped 7 s (request timeout 3 s)", **fig,
               note=f"training went on: {logged_during:,} points logged by the end of the pause")
        assert fig["missing"] == 0 and fig["duplicates"] == 0
        assert logged_during > 8_000, "training waited on the broker"


@pytest.mark.own_brokers
def test_slow_then_cut_network_between_producer_and_broker(tmp_path):
    cluster = KafkaCluster(1, tmp_path / "kafka")
    proxy = TcpProxy(cluster.ports[0])
    cluster.advertised = [proxy.port]  # every client reaches the broker through the proxy
    try:
        with training_under_way(cluster, tmp_path, 30_000, 10.0, 5_000) as (worker, trainer):
            proxy.latency = 0.05
            time.sleep(2)
            proxy.latency = 0.0
            proxy.set_cut(True)
            time.sleep(5)
            proxy.set_cut(False)
            t0 = time.monotonic()
            fig = delivered(worker, trainer, 30_000, t0)
            record("network", "network slow (50 ms per chunk, 2 s), then cut for 5 s", **fig,
                   note="a TCP proxy in front of the broker")
            assert fig["missing"] == 0 and fig["duplicates"] == 0
    finally:
        cluster.stop()
        proxy.close()


def test_worker_killed_mid_stream(kafka1, tmp_path):
    with training_under_way(kafka1, tmp_path, 30_000, 8.0, 8_000) as (worker, trainer):
        worker.kill()
        time.sleep(1)
        t0 = time.monotonic()
        worker.start(90)
        fig = delivered(worker, trainer, 30_000, t0)
        # docs/architecture.md, Dependencies: Faust is at least once *with possible skips*. The raw points are the guarantee; once the
        # run has finished, the sink checks its running aggregates against them and recomputes a shortfall
        aggs = wait_until(lambda: (a := worker.get(f"/api/runs/{trainer.run_id}/aggregates")["x"])["count"] == 30_000
                          and a, 60, what="the run's aggregates complete")
        repaired = worker.health()["sink"]["aggregates_repaired"]
        record("worker_killed", "worker (processors, sink, API) SIGKILLed mid-stream, restarted", **fig,
               note=f"raw points complete; aggregates complete ({aggs['count']:,}), "
                    f"{'recomputed from the points after a skipped batch' if repaired else 'no batch skipped'}")
        assert fig["missing"] == 0 and fig["duplicates"] == 0
        assert (aggs["min"], aggs["max"], aggs["last"]) == (0.0, 29_999.0, 29_999.0)


@pytest.mark.parametrize("chunk", ["whole fetches", "4 KiB chunks"])
def test_sink_killed_between_insert_and_offset_commit(kafka1, tmp_path, chunk):
    """The sink writes a fetch as chunks, building the next while the last is inserted; killed after an
    insert, before its commit, it replays that chunk under its intent. With 4 KiB chunks nearly every event
    is a chunk of its own, and the crash comes with the next one already built."""
    kafka1.start()
    extra = {"RUNWATCH_SINK_MAX_BATCH_BYTES": "4096"} if chunk == "4 KiB chunks" else {}
    worker = start_worker(kafka1, tmp_path, RUNWATCH_TEST_FAULT="crash-after-insert:5", **extra)
    trainer = Trainer(sdk_env(kafka1, worker, tmp_path / "sdk"), tmp_path, 30_000, 6.0)
    wait_until(lambda: worker.proc.poll() is not None, 60, what="the sink's crash after an insert")
    worker.extra_env.pop("RUNWATCH_TEST_FAULT")
    t0 = time.monotonic()
    worker.start(90)
    try:
        fig = delivered(worker, trainer, 30_000, t0)
        record(f"sink_killed_{'chunked' if extra else 'whole'}",
               f"sink killed after its 5th insert, before committing the offsets ({chunk})", **fig,
               note="the replay carries the same insert deduplication token")
        assert fig["missing"] == 0 and fig["duplicates"] == 0
    finally:
        worker.stop()


def test_clickhouse_unavailable_for_a_while(kafka1, tmp_path):
    kafka1.start()
    down = tmp_path / "clickhouse-down"
    down.write_text("")
    worker = start_worker(kafka1, tmp_path, RUNWATCH_TEST_FAULT=f"clickhouse-down-while:{down}")
    try:
        trainer = Trainer(sdk_env(kafka1, worker, tmp_path / "sdk"), tmp_path, 20_000, 4.0)
        trainer.wait()
        time.sleep(2)
        assert stored_values(worker, trainer.run_id) == []
        # nothing is stored, and the read API still shows every point from the broker (the live tail,
        # docs/api.md): the first read makes the run watched, a moment later the tail has it all
        want = [float(i) for i in range(20_000)]
        assert wait_until(lambda: stored_values(worker, trainer.run_id, stored=False) == want, 30, what="the live tail")
        assert stored_values(worker, trainer.run_id) == []
        assert worker.health()["live"]["held_points"] >= 20_000
        retries = worker.health()["sink"]["retries"]
        down.unlink()
        t0 = time.monotonic()
        fig = account(worker, trainer.run_id, 20_000)
        fig["recovery_s"] = round(time.monotonic() - t0, 2)
        record("clickhouse_down", "ClickHouse unavailable while a whole run is sent", **fig,
               note=f"the sink retried {retries} times, dropped nothing; recovery: back → all queryable; "
                    "meanwhile the live tail showed all of it")
        assert fig["missing"] == 0 and fig["duplicates"] == 0 and retries > 0
        # stored and tail side by side, then the tail let go: each point shown once throughout
        assert stored_values(worker, trainer.run_id, stored=False) == want
        wait_until(lambda: worker.health()["live"]["held_points"] == 0, 30, what="the tail let go of stored events")
        assert stored_values(worker, trainer.run_id, stored=False) == want
    finally:
        worker.stop()


def test_training_process_killed(kafka1, tmp_path):
    with training_under_way(kafka1, tmp_path, 100_000, 10.0, 20_000) as (worker, trainer):
        trainer.proc.send_signal(signal.SIGKILL)
        trainer.proc.wait(10)
        logged = trainer.logged()  # at least this many were logged (the progress file lags by < 500)
        run_id = trainer.run_id
        time.sleep(3)
        values = stored_values(worker, run_id)
        distinct = len(set(values))
        record("training_killed", "training process SIGKILLed", sent=f"≥ {logged:,}", stored=len(values),
               missing=f"≤ {max(0, logged + 500 - distinct):,}", duplicates=len(values) - distinct,
               note="lost: what had not reached the broker (the buffer and the batch in flight; "
                    "10,000 points/s, flush every 50 ms)")
        # the loss is what had not reached the broker: about 2 flush intervals and one send at this rate
        assert len(values) == distinct and distinct >= logged - 3_000 and values == sorted(values)


SPOOL_LIMITS = {
    # runwatch's own bound on the spool
    "bound": ({"RUNWATCH_SPOOL_MAX_BYTES": 1 << 20}, "spool full (1 MiB) while the broker is down"),
    # the spool's disk fills for real: the kernel refuses the training process's writes past 1 MiB
    # (RLIMIT_FSIZE; a small filesystem would need privileges to mount); no bound of runwatch's is hit
    "disk": ({"TRAINER_FSIZE": 1 << 20}, "the spool's disk full (writes refused past 1 MiB) while the broker is down"),
}


@pytest.mark.own_brokers
@pytest.mark.parametrize("limit", list(SPOOL_LIMITS))
def test_spool_full_training_goes_on_and_drops_are_reported(kafka1, tmp_path, limit):
    extra, what = SPOOL_LIMITS[limit]
    worker = KafkaWorker(kafka1, tmp_path / "w0", _unique("r"))
    env = sdk_env(kafka1, worker, tmp_path / "sdk", TRAINER_LINGER=20, **extra)
    trainer = Trainer(env, tmp_path, 200_000, 2.0)
    wait_until(lambda: trainer.logged() == 200_000, 60, what="training finished without a broker")
    kafka1.start()
    worker.start(90)
    try:
        run_id = trainer.run_id
        def settled():
            r = worker.get(f"/api/runs/{run_id}")
            v = stored_values(worker, run_id)
            return (r, v) if r["dropped_points"] and len(v) + r["dropped_points"] == 200_000 else None
        run, values = wait_until(settled, 60, what="every point stored or counted as dropped")
        record(f"spool_{limit}", what, sent=200_000, stored=len(values), missing=200_000 - len(set(values)),
               duplicates=len(values) - len(set(values)),
               note=f"dropped_points reported on the run: {run['dropped_points']:,}; the run reached {run['status']} "
                    "(control events keep a reserve in the spool, and are held in memory when the disk refuses them)")
        assert len(values) == len(set(values))
        assert len(values) + run["dropped_points"] == 200_000, "every point is either stored or counted"
        assert run["status"] == "Completed"
    finally:
        trainer.proc.kill()
        print(trainer.proc.communicate()[0].decode()[-3000:])
        worker.stop()


@pytest.mark.own_brokers
def test_leader_killed_in_a_three_broker_cluster(tmp_path):
    cluster = KafkaCluster(3, tmp_path / "kafka").start()
    worker = start_worker(cluster, tmp_path)
    try:
        trainer = Trainer(sdk_env(cluster, worker, tmp_path / "sdk"), tmp_path, 30_000, 8.0)
        wait_until(lambda: trainer.logged() >= 8_000, 30, what="training under way")
        leader = cluster.leader_of(f"{worker.prefix}metrics", 0)
        cluster.kill(leader)
        t0 = time.monotonic()
        fig = delivered(worker, trainer, 30_000, t0)
        record("leader_killed", "partition leader SIGKILLed (3 brokers, RF 3, min ISR 2)", **fig,
               note=f"node {leader + 1} stayed down; recovery: kill → all queryable")
        assert fig["missing"] == 0 and fig["duplicates"] == 0
    finally:
        worker.stop()
        cluster.stop()


# ------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def bad_input_stack(tmp_path_factory):
    cluster = make_cluster(1, tmp_path_factory.mktemp("kafka-bad")).start()
    worker = KafkaWorker(cluster, tmp_path_factory.mktemp("worker-bad"), _unique("b"),
                         {"RUNWATCH_MAX_METRIC_NAMES": "100"}).start(90)
    yield cluster, worker
    worker.stop()
    cluster.stop()


def valid_metric_event(run_id: str, names: int = 1, seq: int = 0) -> bytes:
    import numpy as np

    from runwatch.core.events import MetricBatch, MetricName, encode, make_envelope

    batch = MetricBatch.from_arrays([MetricName(name=f"m{i}", kind="scalar", dtype="float") for i in range(names)],
                                    np.arange(names), np.zeros(names), np.zeros(names), np.arange(names, dtype=float))
    return encode(make_envelope(run_id, "bad-input", batch, seq))


wire_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() |
                           st.text(max_size=20) | st.binary(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=4), max_leaves=10)
ENVELOPE_KEYS = ["v", "id", "k", "r", "x", "t", "s", "q", "p"]


@st.composite
def malformed_envelopes(draw):
    """Envelopes from the schema's own shape with one part broken: a key missing, a value of the wrong
    type, an unknown schema version or payload kind."""
    env = msgpack.unpackb(valid_metric_event("hyp"), raw=False)
    how = draw(st.sampled_from(["drop", "retype", "version", "kind", "payload"]))
    key = draw(st.sampled_from(ENVELOPE_KEYS))
    if how == "drop":
        env.pop(key)
    elif how == "retype":
        env[key] = draw(wire_values.filter(lambda v: type(v) is not type(env[key])))
    elif how == "version":
        env["v"] = draw(st.integers(-2**63, 2**64 - 1).filter(lambda v: v != 1))  # what msgpack can carry
    elif how == "kind":
        env["p"] = dict(env["p"], kind=draw(st.text(max_size=12).filter(lambda k: k != "metrics")))
    else:
        env["p"] = draw(wire_values)
    return msgpack.packb(env, use_bin_type=True)


def test_malformed_events_go_to_the_dlq_with_reasons_and_the_worker_keeps_going(bad_input_stack):
    cluster, worker = bad_input_stack
    bad: list[bytes] = [b"", b"not msgpack at all", msgpack.packb([1, 2, 3]), msgpack.packb({"v": 99})]

    @hsettings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(malformed_envelopes())
    def collect(msg):
        bad.append(msg)

    collect()
    before = worker.health()
    produce(cluster.bootstrap, f"{worker.prefix}metrics", [(b"bad-run", m) for m in bad])
    produce(cluster.bootstrap, f"{worker.prefix}logs", [(b"bad-run", m) for m in bad[:10]])
    # the worker keeps going: a valid run right after is stored
    produce(cluster.bootstrap, f"{worker.prefix}metrics", [(b"good-run", valid_metric_event("good-run"))])
    wait_until(lambda: worker.get("/api/runs/good-run/aggregates") if httpx.get(
        f"{worker.api_url}/api/runs/good-run/aggregates", timeout=5).status_code == 200 else None, 60,
        what="a valid event after the bad ones")
    after = wait_until(lambda: (h := worker.health())["processors"]["dead_letters"]
                       - before["processors"]["dead_letters"] >= len(bad) - 5 and h, 60, what="dead letters")
    undecodable = after["processors"]["dead_letters"] - before["processors"]["dead_letters"]
    assert after["processors"]["errors"] == before["processors"]["errors"], "a bad event crashed an agent"
    record("bad_malformed", f"{len(bad)} malformed events on metrics (hypothesis, from the envelope's shape) "
           "and 10 on logs", sent=len(bad) + 10, stored=0, missing="", duplicates="",
           note=f"{undecodable} sent to the dlq by the processors with the reason; the sink recorded the logs "
                f"ones in dead_letters; the worker went on")
    decodable = [m for m in bad if _decodes(m)]
    assert undecodable + len(decodable) >= len(bad) - 1


def _decodes(msg: bytes) -> bool:
    from runwatch.core.events import EventError, decode

    try:
        decode(msg)
        return True
    except EventError:
        return False


def test_oversized_nan_cardinality_order_and_skew(bad_input_stack):
    cluster, worker = bad_input_stack
    import numpy as np

    from runwatch.core.events import MetricBatch, MetricName, encode, make_envelope, this_source

    from runwatch.core.events import RunCreated

    src = this_source()
    for rid in ("odd-run", "bomb-run"):  # the runs exist, so their metrics can be read back
        produce(cluster.bootstrap, f"{worker.prefix}runs",
                [(rid.encode(), encode(make_envelope(rid, "bad-input", RunCreated(created_ts=time.time()), 0)))])
    names = [MetricName(name="v", kind="scalar", dtype="float")]
    # NaN and ±inf are values, stored as such; steps out of order and repeated; a timestamp a day ahead
    odd = MetricBatch.from_arrays(names, np.zeros(5), np.array([3, 1, 2, 2, 0]),
                                  np.array([10, 20, 30, 40, int((time.time() + 86400) * 1e6)]),
                                  np.array([np.nan, np.inf, -np.inf, 2.0, 0.5]))
    repeat = encode(make_envelope("odd-run", "bad-input", odd, 7, src))
    produce(cluster.bootstrap, f"{worker.prefix}metrics", [(b"odd-run", repeat), (b"odd-run", repeat)])
    # a cardinality bomb: one run with 10,000 names in one batch
    bomb = valid_metric_event("bomb-run", names=10_000)
    produce(cluster.bootstrap, f"{worker.prefix}metrics", [(b"bomb-run", bomb)])
    # an oversized message is refused by the producer with a clear error, not silently
    from runwatch.core.events import LogBatch

    huge = LogBatch(file="f", first_seq=0, ts=np.zeros(1, "<i8").tobytes(), lines=["x" * (20 << 20)])
    with pytest.raises(Exception, match="(?i)too large|MessageSizeTooLarge|max_request_size"):
        produce(cluster.bootstrap, f"{worker.prefix}logs",
                [(b"big-run", encode(make_envelope("big-run", "bad-input", huge, 0, src)))])
    values = wait_until(lambda: (v := stored_values(worker, "odd-run", "v")) and len(v) == 5 and v, 60,
                        what="odd values stored")
    assert [str(x) for x in values] == ["0.5", "inf", "-inf", "2.0", "nan"]  # by step: 0, 1, 2, 2, 3
    bomb_state = wait_until(lambda: (h := worker.health())["processors"]["dead_letters"] and h, 30, what="bomb")
    aggs = httpx.get(f"{worker.api_url}/api/runs/bomb-run/aggregates", timeout=10)
    kept = len(aggs.json()) if aggs.status_code == 200 else 0
    record("bad_values", "NaN/±inf, out-of-order and repeated steps, a timestamp a day ahead, the same event twice",
           sent=5, stored=len(values), missing=0, duplicates=len(values) - 5,
           note="stored as sent, once; the repeated event was dropped by (source, seq)")
    record("bad_cardinality", "one run sends 10,000 metric names (max_metric_names 100)", sent=10_000,
           stored=kept, note="the batch goes to the dlq with the reason; nothing of it is aggregated")
    record("bad_oversized", "a 20 MiB message", sent=1, stored=0,
           note="refused by the producer (max_request_size) with MessageSizeTooLarge")
    assert kept == 0 and bomb_state["processors"]["errors"] == 0


# ------------------------------------------------------------------------------ security
def test_read_api_requires_its_token(bad_input_stack, tmp_path):
    cluster, _ = bad_input_stack
    worker = KafkaWorker(cluster, tmp_path / "w", _unique("t"), {"RUNWATCH_API_TOKEN": "s3cret"}).start(90)
    try:
        assert httpx.get(f"{worker.api_url}/api/health", timeout=5).status_code == 200  # health stays open
        for path in ("/api/runs", "/api/experiments", "/api/compute"):
            r = httpx.get(f"{worker.api_url}{path}", timeout=5)
            assert r.status_code == 401 and "bearer token" in r.json()["error"]
            wrong = httpx.get(f"{worker.api_url}{path}", headers={"Authorization": "Bearer nope"}, timeout=5)
            assert wrong.status_code == 401
            ok = httpx.get(f"{worker.api_url}{path}", headers={"Authorization": "Bearer s3cret"}, timeout=5)
            assert ok.status_code == 200
        put = httpx.put(f"{worker.api_url}/api/runs/r1/files/a.txt", content=b"x", timeout=5)
        assert put.status_code == 401
        record("api_token", "read API without / with a wrong / with the token", note="401, 401, 200")
    finally:
        worker.stop()


# ------------------------------------------------------------------------------ scale-out
def _produce_workload(bootstrap: str, topic: str, runs: int, batches: int, points: int) -> None:
    import numpy as np

    from runwatch.core.events import MetricBatch, MetricName, Source, encode, make_envelope

    names = [MetricName(name="x", kind="scalar", dtype="float")]
    idx = np.zeros(points, np.uint32)
    ts = np.full(points, int(time.time() * 1e6))

    async def go():
        from aiokafka import AIOKafkaProducer

        p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, compression_type="lz4")
        await p.start()
        try:
            futures = []
            for b in range(batches):
                steps = np.arange(b * points, (b + 1) * points)
                for r in range(runs):
                    src = Source(host="bench", pid=r, instance=f"run{r}")
                    batch = MetricBatch.from_arrays(names, idx, steps, ts, steps.astype(float))
                    futures.append(await p.send(topic, encode(make_envelope(f"scale-{r}", "scale", batch, b, src)),
                                                key=f"scale-{r}".encode()))
            await asyncio.gather(*futures)
        finally:
            await p.stop()
    asyncio.run(go())


def _aggregate_outputs(bootstrap: str, topic: str, expected: int, timeout: float) -> list:
    """(run_id, worker source key, worker ts, partition, offset, count of x, version) of every aggregates event,
    once `expected` arrived."""
    from runwatch.core.events import MetricAggregates, decode

    async def go():
        from aiokafka import AIOKafkaConsumer

        c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
        await c.start()
        out, deadline = [], time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and len(out) < expected:
                for msgs in (await c.getmany(timeout_ms=500)).values():
                    for m in msgs:
                        env = decode(m.value)
                        if isinstance(env.payload, MetricAggregates):
                            counts = [r["count"] for r in env.payload.rows if r.get("name") == "x"]
                            out.append((env.run_id, env.source.key, env.ts, m.partition, m.offset,
                                        max(counts, default=0), env.seq))
        finally:
            await c.stop()
        return out
    return asyncio.run(go())


def test_scale_out_on_four_partitions_with_one_two_and_four_workers(tmp_path):
    cluster = make_cluster(3, tmp_path / "kafka").start()
    runs, batches, points = 24, 20, 2_000
    total = runs * batches
    try:
        for n in (1, 2, 4):
            prefix = _unique(f"s{n}")
            extra = {"RUNWATCH_PARTITIONS": "4"}
            main = start_worker(cluster, tmp_path, prefix, **extra)
            helpers = []
            for i in range(n - 1):
                helpers.append(processors_worker(cluster, tmp_path / f"proc-{n}-{i}", prefix, extra))
            time.sleep(8 if n > 1 else 1)  # let the group settle before the load
            try:
                t0 = time.monotonic()
                _produce_workload(cluster.bootstrap, f"{prefix}metrics", runs, batches, points)
                produced = time.monotonic() - t0
                outs = _aggregate_outputs(cluster.bootstrap, f"{prefix}aggregates", total, 120)
                assert len(outs) >= total, f"{len(outs)} of {total} batches aggregated"
                ts = sorted(o[2] for o in outs)
                rate = total * points / max(ts[-1] - ts[0], 1e-6)
                workers = {o[1] for o in outs}
                # no run's events were processed by two workers at once: per run, each worker's span of
                # outputs (in the run's partition order) never overlaps another worker's span
                overlaps = 0
                for r in {o[0] for o in outs}:
                    mine = sorted((o for o in outs if o[0] == r), key=lambda o: o[4])
                    spans: dict[str, list[float]] = {}
                    for o in mine:
                        spans.setdefault(o[1], []).append(o[2])
                    ranges = sorted((min(v), max(v)) for v in spans.values())
                    overlaps += sum(1 for a, b in zip(ranges, ranges[1:]) if b[0] < a[1])
                counts = {}
                # what the processors sent last for each run: its count of points (the store keeps the highest version)
                last = {}
                for o in outs:
                    if o[6] >= last.get(o[0], (-1, 0))[0]:
                        last[o[0]] = (o[6], o[5])
                short = {r: c for r, (_, c) in last.items() if c != batches * points}
                for r in range(runs):
                    agg = wait_until(lambda: (a := main.get(f"/api/runs/scale-{r}/aggregates").get("x"))
                                     and a["count"] == batches * points and a, 60,
                                     what=f"final aggregates of scale-{r} (the processors' last counts that are "
                                          f"not {batches * points:,}: {short})")
                    counts[r] = agg["count"]
                record(f"scale_{n}", f"scale-out: {n} worker(s), 4 partitions, 3 brokers", sent=total * points,
                       stored=sum(counts.values()), missing=total * points - sum(counts.values()), duplicates=0,
                       note=f"{rate:,.0f} points/s through the processors ({total:,} batches of {points:,}; "
                            f"produced in {produced:.1f} s); {len(workers)} worker(s) did work; "
                            f"overlapping spans of one run on two workers: {overlaps}")
                assert overlaps == 0
                assert len(workers) == n or n > 1 and len(workers) >= 2
            finally:
                for w in helpers:
                    w.stop()
                main.stop()
    finally:
        cluster.stop()


@pytest.mark.own_brokers
def test_sasl_scram_over_tls_end_to_end(tmp_path, caplog):
    cluster = KafkaCluster(1, tmp_path / "kafka", scram=("runwatch", "s3cret-pw")).start()
    ca = str(cluster.workdir / "tls" / "ca.pem")
    secure = {"RUNWATCH_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "RUNWATCH_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
              "RUNWATCH_KAFKA_SASL_USERNAME": "runwatch", "RUNWATCH_KAFKA_SASL_PASSWORD": "s3cret-pw",
              "RUNWATCH_KAFKA_SSL_CAFILE": ca}
    cluster.advertised = cluster.secure_ports  # clients only know the SASL_SSL listener
    worker = KafkaWorker(cluster, tmp_path / "w", _unique("sec"), secure).start(90)
    try:
        env = sdk_env(cluster, worker, tmp_path / "sdk", **secure)
        trainer = Trainer(env, tmp_path, 5_000, 1.0)
        trainer.wait()
        fig = account(worker, trainer.run_id, 5_000)
        assert fig["missing"] == 0 and fig["duplicates"] == 0

        async def wrong_password():
            from aiokafka import AIOKafkaProducer

            from runwatch.core.settings import Settings

            s = Settings.load(home=tmp_path, kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                              kafka_sasl_username="runwatch", kafka_sasl_password="wrong", kafka_ssl_cafile=ca)
            p = AIOKafkaProducer(bootstrap_servers=cluster.secure_bootstrap, **s.kafka_args())
            try:
                await p.start()
            finally:
                await p.stop()
        with pytest.raises(Exception, match="Unable to bootstrap"):
            asyncio.run(wrong_password())
        assert "SaslAuthenticationFailed" in caplog.text  # aiokafka says why
        record("sasl", "SASL/SCRAM-SHA-512 over TLS for producers, processors and sink", **fig,
               note="a wrong password is refused with an authentication error")
    finally:
        worker.stop()
        cluster.stop()


def test_a_second_worker_joins_and_leaves_mid_stream(kafka1, tmp_path):
    kafka1.start()
    prefix = _unique("j")
    extra = {"RUNWATCH_PARTITIONS": "4"}
    worker = start_worker(kafka1, tmp_path, prefix, **extra)
    helper = None
    try:
        env = sdk_env(kafka1, worker, tmp_path / "sdk", RUNWATCH_PARTITIONS=4)
        trainers = [Trainer(env, tmp_path, 20_000, 10.0) for _ in range(3)]  # 3 runs: spread over partitions
        wait_until(lambda: all(t.logged() >= 3_000 for t in trainers), 30, what="training under way")
        helper = processors_worker(kafka1, tmp_path / "helper", prefix, extra)
        wait_until(lambda: all(t.logged() >= 12_000 for t in trainers), 30, what="the second worker joined")
        helper.stop()  # it leaves: its partitions go back to the first worker
        t0 = time.monotonic()
        for t in trainers:
            t.wait()
        figs = [account(worker, t.run_id, 20_000) for t in trainers]
        counts = [wait_until(lambda: worker.get(f"/api/runs/{t.run_id}/aggregates").get("x", {}).get("count") == 20_000,
                             60, what="aggregates complete") and 20_000 for t in trainers]
        repaired = worker.health()["sink"]["aggregates_repaired"]
        record("rebalance", "a second worker joins mid-stream, then leaves (4 partitions, 3 runs)",
               sent=60_000, stored=sum(f["stored"] for f in figs), missing=sum(f["missing"] for f in figs),
               duplicates=sum(f["duplicates"] for f in figs), recovery_s=round(time.monotonic() - t0, 2),
               note=f"raw points complete; aggregates complete ({sum(counts):,}), "
                    f"{repaired} run(s) recomputed from the points after the rebalances")
        assert all(f["missing"] == 0 and f["duplicates"] == 0 for f in figs)
    finally:
        if helper is not None:
            helper.stop()
        worker.stop()

"""Fixtures: a real embedded broker (Tansu) per session, unique topics per test, a real worker on chDB."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from runwatch.core.settings import Settings
from runwatch.core.net import free_port, port_open
from runwatch.stack import tansu_binary

ROOT = Path(__file__).resolve().parent.parent
# Runs in tests log only what they are told to: no system sampling thread, no tee of pytest's own output (both on
# by default for users); tests/test_system.py turns each back on where it is what is tested. Subprocesses inherit it.
os.environ.setdefault("RUNWATCH_SYSTEM_METRICS", "false")
os.environ.setdefault("RUNWATCH_CAPTURE_OUTPUT", "false")


def wait_until(check, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll `check` until it returns a truthy value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # the stack may not have the data yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


class _Process:
    """A child process the tests start: SIGKILL it, or stop it politely."""

    proc: subprocess.Popen | None = None
    stop_timeout = 10

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Broker(_Process):
    """A Tansu broker process on 127.0.0.1 (memory storage)."""

    def __init__(self, port: int | None = None, log_dir: Path | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = (log_dir or Path("/tmp")) / f"tansu-{self.port}.log"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Broker":
        addr = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", addr, "--advertised-listener-url", addr,
             "--storage-engine", "memory://tansu/"],
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(lambda: port_open(self.port), 10, what=f"broker on port {self.port}")
        return self


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    b = Broker(log_dir=tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}."


@pytest.fixture
def sdk_settings(broker, tmp_path, monkeypatch):
    """Environment for the SDK: a fresh RUNWATCH_HOME and a unique topic prefix on the session broker."""
    prefix = _unique("t")
    monkeypatch.setenv("RUNWATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RUNWATCH_BOOTSTRAP_SERVERS", broker.bootstrap)
    monkeypatch.setenv("RUNWATCH_TOPIC_PREFIX", prefix)
    monkeypatch.setenv("RUNWATCH_BROKER_KIND", "tansu")
    monkeypatch.setenv("RUNWATCH_FLUSH_INTERVAL", "0.05")
    yield Settings.load()
    from runwatch.producers.emitter import close_all

    close_all(5)


def consume(bootstrap: str, topics: list[str], until, timeout: float = 20.0):
    """Read `topics` from the beginning with a plain aiokafka consumer until `until(messages)` holds."""
    from aiokafka import AIOKafkaConsumer

    async def run():
        c = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             group_id=None, enable_auto_commit=False)
        await c.start()
        got = []
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                batch = await c.getmany(timeout_ms=200)
                for msgs in batch.values():
                    got.extend(msgs)
                if until(got):
                    break
        finally:
            await c.stop()
        got.sort(key=lambda m: (m.topic, m.partition, m.offset))
        return got

    return asyncio.run(run())


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    """Write raw messages (key, value) to a topic with a plain aiokafka producer, in order, each acknowledged."""
    from aiokafka import AIOKafkaProducer

    async def go():
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=16 << 20, acks="all")
        await p.start()
        try:
            for key, value in messages:
                await p.send_and_wait(topic, value, key=key)
        finally:
            await p.stop()
    asyncio.run(go())


def decoded(messages):
    from runwatch.core.events import decode

    return [decode(m.value) for m in messages]


class Worker(_Process):
    """The real worker process (processors, sink, read API) on its own RUNWATCH_HOME and topic prefix."""

    stop_timeout = 20

    def __init__(self, broker: Broker, home: Path, prefix: str, extra_env: dict[str, str] | None = None):
        self.broker, self.home, self.prefix = broker, home, prefix
        #: Settings for the worker and for the SDK processes of the tests that use it.
        self.extra_env = dict(extra_env or {})
        self.api_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ, RUNWATCH_HOME=str(self.home), RUNWATCH_BOOTSTRAP_SERVERS=self.broker.bootstrap,
                   RUNWATCH_TOPIC_PREFIX=self.prefix, RUNWATCH_BROKER_KIND="tansu",
                   RUNWATCH_API_PORT=str(self.api_port), RUNWATCH_API_URL=self.api_url,
                   RUNWATCH_AGGREGATES_CHECK_DELAY="1")  # finished runs' aggregates checked after 1 s, not 10
        env.update(self.extra_env)
        return env

    def command(self) -> list[str]:
        """`runwatch worker`; with RUNWATCH_TEST_FAULT, the same worker with that fault in its store's writes."""
        if "RUNWATCH_TEST_FAULT" in self.env():
            return [sys.executable, str(ROOT / "tests" / "fault_worker.py")]
        return [sys.executable, "-m", "runwatch.cli", "worker"]

    def start(self, timeout: float = 60) -> "Worker":
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "worker.log", "ab")
        self.proc = subprocess.Popen(self.command(), env=self.env(), stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        try:
            wait_until(self.ready, timeout, 0.1, what="worker ready")
        except BaseException:
            self.kill()  # a worker that never became ready must not outlive the test
            raise
        return self

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited: {(self.home / 'worker.log').read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.api_url}/api/health", timeout=1).json()["ready"]
        except httpx.HTTPError:
            return False

    def health(self) -> dict:
        return httpx.get(f"{self.api_url}/api/health", timeout=5).json()

    def get(self, path: str, **params):
        r = httpx.get(f"{self.api_url}{path}", params=params, timeout=30)
        r.raise_for_status()
        return r.json()


@pytest.fixture(scope="module")
def worker(broker, tmp_path_factory):
    w = Worker(broker, tmp_path_factory.mktemp("worker-home"), _unique("w")).start()
    yield w
    w.stop()


def point_sdk_at(monkeypatch, worker: Worker, home: Path, **settings: str) -> None:
    """This process's SDK environment: the worker's topics and read API, RUNWATCH_HOME `home`, and `settings`
    (RUNWATCH_<NAME>) on top."""
    monkeypatch.setenv("RUNWATCH_HOME", str(home))
    monkeypatch.setenv("RUNWATCH_BOOTSTRAP_SERVERS", worker.broker.bootstrap)
    monkeypatch.setenv("RUNWATCH_TOPIC_PREFIX", worker.prefix)
    monkeypatch.setenv("RUNWATCH_BROKER_KIND", "tansu")
    monkeypatch.setenv("RUNWATCH_API_URL", worker.api_url)
    for k, v in settings.items():
        monkeypatch.setenv(f"RUNWATCH_{k.upper()}", v)


@pytest.fixture
def stack_env(worker, monkeypatch, tmp_path):
    """SDK environment pointing at the module's worker (its topics and its read API)."""
    point_sdk_at(monkeypatch, worker, tmp_path / "sdk-home", flush_interval="0.05")
    for k, v in worker.extra_env.items():
        monkeypatch.setenv(k, v)
    yield worker
    from runwatch.producers.emitter import close_all

    close_all(5)


def log_rows_table_tags(run) -> None:
    """The rows, table, tags and property both the SDK and the pipeline tests log and check."""
    import numpy as np

    run.log_row("cosine wave", angle=0.5, cos=np.cos(0.5))
    run.log_row("cosine wave", angle=1.0, cos=np.cos(1.0))
    run.log_table("sine wave", {"angle": [0.0, 0.5], "sine": [0.0, 0.479]})
    run.tag("optimizer", "adam")
    run.tag("worth another look")
    run.add_properties({"author": "me"})


def metric_series(run, name: str) -> list:
    """The values of one metric as a list (get_metrics gives a metric logged once as its value)."""
    v = run.get_metrics(name=name).get(name, [])
    return v if isinstance(v, list) else [v]


def unique_name(prefix: str = "exp") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def pytest_collection_modifyitems(config, items):
    """Against an external Kafka cluster (RUNWATCH_TEST_BOOTSTRAP or RUNWATCH_TEST_DOCKER), the tests that kill, pause or proxy the
    brokers they start cannot run: they are deselected, and the run says how many and why."""
    from kafka_cluster import uses_external_cluster

    if not uses_external_cluster():
        return
    own = [i for i in items if i.get_closest_marker("own_brokers")]
    if own:
        items[:] = [i for i in items if not i.get_closest_marker("own_brokers")]
        config.hook.pytest_deselected(items=own)
        where = os.environ.get("RUNWATCH_TEST_BOOTSTRAP") or "a Kafka container (RUNWATCH_TEST_DOCKER)"
        config._runwatch_external_note = (f"external Kafka cluster ({where}): {len(own)} test(s) that kill, pause or "
                                          "proxy their own brokers were deselected: " + ", ".join(i.name for i in own))


def pytest_terminal_summary(terminalreporter, config):
    note = getattr(config, "_runwatch_external_note", None)
    if note:
        terminalreporter.write_line(note, yellow=True)

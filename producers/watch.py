"""wait_for_completion(show_output=True): stream a run's driver logs as they arrive, then its summary."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from runwatch.core.client import run_path
from runwatch.core.errors import NotFound, RunwatchError
from runwatch.core.names import (
    DRIVER_LOG_PREFIX,
    LOG_COUNTS_PROPERTY,
    PROCESSES_PROPERTY,
)
from runwatch.core.states import TERMINAL, WAITING


class RunFailedError(RunwatchError):
    """A run ended Failed; `details` holds get_details() (its error names each failed process)."""

    def __init__(self, message: str, details: dict[str, Any]):
        super().__init__(message)
        self.details = details


def driver_files(files: list[dict[str, Any]]) -> list[str]:
    names = [f["name"] for f in files if f["name"].startswith(DRIVER_LOG_PREFIX)]
    return sorted(names, key=lambda n: int(n[len(DRIVER_LOG_PREFIX):].split(".")[0] or 0))


class OutputFollower:
    """Prints new lines of a run's driver logs on each `poll()`, prefixed by rank when there are several."""

    def __init__(self, api, run_id: str, out: TextIO, files: list[str] | None = None, as_json: bool = False):
        self.api = api
        #: one JSON object a line ({"file", "seq", "ts", "line"}) instead of the text
        self.as_json = as_json
        self.run_id = run_id
        self.out = out
        self.fixed = files
        self.cursor: dict[str, int] = {}
        self.printed: dict[str, int] = {}
        #: how many processes the run starts (its submit recorded it), looked up once there is output
        self.processes: int | None = None

    def _several(self, files: list[str]) -> bool:
        """Whether lines are prefixed by rank: the run starts several processes. Known from the run itself, not
        from the files seen so far: one rank's first lines are often stored before another's file exists."""
        if self.fixed is not None:
            return len(self.fixed) > 1
        if self.processes is None and files:
            count = str((self.api.get(run_path(self.run_id)).get("properties") or {}).get(PROCESSES_PROPERTY, ""))
            self.processes = int(count) if count.isdigit() else 1  # not a submitted run (or a property set by hand)
        return (self.processes or 1) > 1 or len(files) > 1 or len(self.cursor) > 1

    def poll(self) -> int:
        files = self.fixed or driver_files(self.api.get(run_path(self.run_id, "files")))
        several = self._several(files)
        n = 0
        for f in files:
            while True:
                page = self.api.get(run_path(self.run_id, "logs"), file=f, after_seq=self.cursor.get(f, -1),
                                    limit=5000)
                lines = page["lines"]
                if not lines:
                    break
                if self.as_json:
                    import json

                    self.out.write("".join(json.dumps({"file": f, "seq": ln["seq"], "ts": ln.get("ts"),
                                                       "line": ln["line"]}, ensure_ascii=False) + "\n"
                                           for ln in lines))
                else:
                    prefix = f"[rank {lines[0]['rank']}] " if several and f.startswith(DRIVER_LOG_PREFIX) else ""
                    self.out.write("".join(f"{prefix}{ln['line']}\n" for ln in lines))
                self.cursor[f] = page["next_seq"]
                self.printed[f] = self.printed.get(f, 0) + len(lines)
                n += len(lines)
                if len(lines) < 5000:
                    break
        if n:
            self.out.flush()
        return n

    def caught_up(self, expected: dict[str, int]) -> bool:
        files = self.fixed or [f for f in expected if f.startswith(DRIVER_LOG_PREFIX)]
        return all(self.printed.get(f, 0) >= expected.get(f, 0) for f in files)

    def finish(self, details: dict[str, Any], within: float = 10.0) -> None:
        """After the run ended: print what is still on its way. The final status can overtake the last log
        lines (they travel on another topic), so wait for the line counts the launcher recorded, at most
        `within` seconds."""
        expected = json.loads(details.get("properties", {}).get(LOG_COUNTS_PROPERTY) or "{}")
        settle = time.monotonic() + within
        self.poll()
        while not self.caught_up(expected) and time.monotonic() < settle:
            time.sleep(0.2)
            self.poll()


def wait(run, show_output: bool, raise_on_error: bool, timeout: float | None, poll_interval: float,
         out: TextIO | None = None) -> dict[str, Any]:
    out = out or sys.stdout
    api = run.experiment.workspace.read_api()
    deadline = None if timeout is None else time.monotonic() + timeout
    follower = OutputFollower(api, run.id, out) if show_output else None
    last_status = None
    if show_output:
        out.write(f"RunId: {run.id}\nWeb View: {run.get_portal_url()}\n\n")
        out.flush()
    unseen_since = time.monotonic()
    while True:
        try:
            status = run.get_status()
        except NotFound:
            # a run submitted a moment ago is on its way through the pipeline
            if time.monotonic() - unseen_since > 30:
                raise
            time.sleep(poll_interval)
            continue
        if show_output and status != last_status:
            out.write(f"[status] {status}\n")
            out.flush()
        last_status = status
        if follower is not None and status not in WAITING:
            follower.poll()
        if status in TERMINAL:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"run {run.id} is still {status} after {timeout} s")
        time.sleep(poll_interval)
    details = run.get_details()
    if follower is not None:
        follower.finish(details)
        _summary(out, run, details)
    if raise_on_error and details["status"] == "Failed":
        raise RunFailedError(f"run {run.id} failed: {json.dumps(details.get('error'))}", details)
    return details


def _summary(out: TextIO, run, d: dict[str, Any]) -> None:
    out.write("\nExecution Summary\n=================\n")
    out.write(f"RunId: {run.id}\nWeb View: {run.get_portal_url()}\nStatus: {d['status']}\n")
    if d.get("durationSeconds") is not None:
        out.write(f"Duration: {d['durationSeconds']:.1f} s\n")
    err = d.get("error")
    if d["status"] == "Failed" and err:
        out.write(f"Error: {err.get('message')}\n")
        for p in err.get("details") or []:
            if p.get("stopped_by_launcher"):
                out.write(f"  rank {p['rank']} was stopped when another rank failed\n")
            elif p.get("exit_code"):
                out.write(f"  rank {p['rank']} exited with code {p['exit_code']}; last lines of its stderr:\n")
                out.write("".join(f"    {ln}\n" for ln in p.get("stderr_tail", [])[-5:]))
    out.write("\n")
    out.flush()

"""Bursts on the embedded stack as a user runs it (`runwatch up` under a temporary home): one process logs
flat out, with the broker up, with the broker down for the first half, and one kind of value at a time;
and `runwatch down` with a million points the worker has not stored. Figures are ratios to baselines
measured in the same run where the issue defines one; each goal gets its verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks import ROOT

#: One process, one run: logs `KIND` flat out and reports when it is done; the parent samples its memory.
TRAINER = r'''
import json, os, sys, time
import numpy as np
from runwatch import Workspace, Experiment
kind, metrics, steps, progress = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
gate = os.environ.get("BENCH_GATE")
run = Experiment(Workspace.from_config(), "burst").start_logging()
t_first = time.time()
def note(**kw):
    with open(progress + ".tmp", "w") as f:
        json.dump(dict(kw, run_id=run.id, t_first=t_first), f)
    os.replace(progress + ".tmp", progress)
names = [f"m{j}" for j in range(metrics)]
log = run.log
note(phase="started", t=time.time())
t_first = time.time()
t0 = time.perf_counter()
half = steps // 2
for i in range(steps):
    if gate and i == half:
        note(phase="half", t=time.time())
        while not os.path.exists(gate):
            time.sleep(0.01)
    if kind == "numbers":
        for n in names:
            log(n, float(i))
    elif kind == "strings":
        for n in names:
            log(n, "v%d" % i)
    elif kind == "rows":
        run.log_row("table", **{n: float(i) for n in names})
    elif kind == "lists" and i % 1000 == 0:
        for n in names:
            run.log_list(n, np.arange(i, i + 1000, dtype=float))
    elif kind == "tables" and i % 1000 == 0:
        run.log_table("t", {n: list(range(i, i + 1000)) for n in names})
logged = time.perf_counter() - t0
run.complete()
st = run.emitter.stats
note(phase="done", t=time.time(), logged_s=logged, dropped=st.points_dropped, spooled=st.events_spooled,
     compactions=st.compactions, compact_s=st.compact_seconds, resent=st.events_resent)
'''

def _rw(home: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
    env["RUNWATCH_HOME"] = str(home)
    out = subprocess.run([sys.executable, "-m", "runwatch.cli", *args], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"runwatch {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")


def _trainer(home: Path, kind: str, metrics: int, steps: int, gate: Path | None = None):
    progress = home.parent / f"progress-{kind}-{time.monotonic_ns()}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
    env["RUNWATCH_HOME"] = str(home)
    if gate is not None:
        env["BENCH_GATE"] = str(gate)
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, kind, str(metrics), str(steps), str(progress)], env=env,
                            cwd=ROOT)
    return proc, progress


def _state(progress: Path) -> dict:
    try:
        return json.loads(progress.read_text())
    except (OSError, ValueError):
        return {}


def _watch(proc, progress: Path, until_phase: str | None = None) -> tuple[int, int]:
    """Sample the trainer's memory until it exits (or reaches `until_phase`): (baseline RSS, peak RSS)."""
    p = psutil.Process(proc.pid)
    while _state(progress).get("phase") is None and proc.poll() is None:
        time.sleep(0.005)
    base = peak = p.memory_info().rss
    while proc.poll() is None and (until_phase is None or _state(progress).get("phase") != until_phase):
        try:
            peak = max(peak, p.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    return base, peak


def _stored(home: Path, run_id: str) -> int:
    from runwatch.core.client import ApiClient, run_path
    from runwatch.core.errors import RunwatchError
    from runwatch.core.settings import Settings

    try:
        aggs = ApiClient(Settings.load(home=home)).get(run_path(run_id, "aggregates"))
    except RunwatchError:
        return 0
    return sum(a["count"] for a in aggs.values())


def _until_stored(home: Path, run_id: str, n: int, timeout: float = 600) -> float:
    deadline = time.time() + timeout
    while _stored(home, run_id) < n:
        if time.time() > deadline:
            raise RuntimeError(f"{run_id}: {_stored(home, run_id):,} of {n:,} points stored after {timeout} s")
        time.sleep(0.05)
    return time.time()


def bench_burst(quick: bool, tmp: Path, record) -> None:
    from rich.console import Console

    Console().rule("Burst: one process logs flat out (20 metrics), embedded stack")
    metrics, steps = 20, (100_000 if quick else 500_000)
    total = metrics * steps
    home = tmp / "burst-home"
    _rw(home, "up")
    try:
        proc, progress = _trainer(home, "numbers", metrics, steps)
        base, peak = _watch(proc, progress)
        st = _state(progress)
        done = _until_stored(home, st["run_id"], total - st["dropped"])
        e2e = done - st["t_first"]  # from the first log() until the last point is queryable
        record(f"{total:,} points flat out, broker up: dropped", st["dropped"], "points", "0", met=st["dropped"] == 0,
               note=f"logged in {st['logged_s']:.1f} s; {st['compactions']} compactions on the training thread "
                    f"({st['compact_s'] * 1000:.0f} ms); spooled {st['spooled']} events")
        record("… first log() → every point queryable", e2e, "s", note=f"{total:,} points")
        record("… end to end", total / e2e, "points/s", "≥ 1,500,000", met=total / e2e >= 1_500_000)
        record("… peak RSS of the trainer above its own", (peak - base) / 2**20, "MiB", "≤ 200",
               met=(peak - base) / 2**20 <= 200)

        # the broker down for the first half: the spool takes it, the stack sends it when it is back
        _rw(home, "down")
        gate = tmp / "burst-gate"
        proc, progress = _trainer(home, "numbers", metrics, steps, gate)
        base, peak = _watch(proc, progress, until_phase="half")
        _rw(home, "up")
        back = time.time()
        gate.write_text("")
        b2, p2 = _watch(proc, progress)
        st = _state(progress)
        done = _until_stored(home, st["run_id"], total - st["dropped"])
        record(f"{total:,} points, broker down for the first half: dropped", st["dropped"], "points",
               "0 with the default spool", met=st["dropped"] == 0,
               note=f"spooled {st['spooled']} events; all stored {done - back:.1f} s after the stack was back")
        record("… peak RSS of the trainer above its own", (max(peak, p2) - base) / 2**20, "MiB", "≤ 200",
               met=(max(peak, p2) - base) / 2**20 <= 200)

        for kind, steps_k in (("strings", steps // 10), ("rows", steps // 4), ("lists", steps), ("tables", steps)):
            proc, progress = _trainer(home, kind, metrics, steps_k)
            base, peak = _watch(proc, progress)
            st = _state(progress)
            n = metrics * steps_k
            done = _until_stored(home, st["run_id"], n - st["dropped"])
            record(f"{kind}: {n:,} points flat out: dropped", st["dropped"], "points", "0", met=st["dropped"] == 0,
                   note=f"peak RSS +{(peak - base) / 2**20:,.0f} MiB (bound 200); "
                        f"{n / (done - st['t_first']):,.0f} points/s end to end")
    finally:
        _rw(home, "down", "--force")


def bench_restart(quick: bool, tmp: Path, record) -> None:
    """`runwatch down` with 1,000,000 points the worker has not stored (it is stopped), and `up` after it."""
    import signal

    from rich.console import Console

    Console().rule("Restart: down with unstored points, up")
    home = tmp / "restart-home"
    _rw(home, "up")
    rec = json.loads((home / "stack.json").read_text())
    n = 200_000 if quick else 1_000_000
    try:
        os.kill(rec["worker_pid"], signal.SIGSTOP)
        proc, progress = _trainer(home, "numbers", 1, n)
        proc.wait(300)
        st = _state(progress)
        t0 = time.time()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
        out = subprocess.run([sys.executable, "-m", "runwatch.cli", "down", "--timeout", "2"], env=dict(
            env, RUNWATCH_HOME=str(home)), capture_output=True, text=True, cwd=ROOT)
        down_s = time.time() - t0
        t1 = time.time()
        _rw(home, "up")
        up_s = time.time() - t1
        done = _until_stored(home, st["run_id"], n)
        record(f"runwatch down, {n:,} points not stored (worker stopped)", down_s, "s",
               note=f"of it 2 s waiting for the worker (--timeout 2); {out.stdout.strip().splitlines()[0][:90]}")
        record("runwatch up after it", up_s, "s")
        record(f"… all {n:,} points stored after up", done - t1, "s")
    finally:
        try:
            os.kill(rec["worker_pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
        _rw(home, "down", "--force")

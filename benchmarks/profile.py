"""Profile the 4-process ingest (workload 2) with py-spy: `./dev bench --profile`.

Starts the embedded broker and a worker, runs 4 trainer processes (1,000 runs x 10 metrics x 1,000
steps), samples the worker and one trainer with py-spy while they run, and prints the CPU each process
spent per point and each profile's heaviest frames. Flame graphs (SVG) go to benchmarks/results/profiles/.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from benchmarks import ROOT

OUT = ROOT / "benchmarks" / "results" / "profiles"
console = Console()


def _py_spy() -> str:
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not exe:
        raise SystemExit("py-spy is not installed: `./dev setup` installs it (the `bench` extra)")
    return exe


def _record(exe: str, pid: int, name: str, seconds: int) -> list[subprocess.Popen]:
    """A raw profile (for the summary) and an SVG flame graph of one process; py-spy samples from outside."""
    common = ["-p", str(pid), "-r", "100", "-d", str(seconds), "--nonblocking", "--threads"]
    return [subprocess.Popen([exe, "record", *common, "-f", fmt, "-o", str(OUT / f"{name}.{ext}")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for fmt, ext in (("raw", "txt"), ("flamegraph", "svg"))]


def summarize(path: Path, top: int = 15) -> list[tuple[float, str]]:
    """Frames by the share of samples they were on the stack of (idle waits in select left out)."""
    total, inclusive = 0, collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if frames[-1].startswith(("EpollSelector.select", "Condition.wait", "Event.wait")):
            continue
        total += int(n)
        for f in set(frames[1:]):
            if any(k in f for k in ("runwatch/", "sinks/", "processors/", "producers/", "aiokafka/", "faust/",
                                    "pyarrow/", "chdb/", "clickhouse_connect/", "numpy/", "codec")):
                inclusive[f] += int(n)
    return [(100 * v / max(total, 1), k) for k, v in inclusive.most_common(top)]


def main(runs: int = 1000, spy: bool = True) -> int:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from benchmarks.__main__ import _env, _worker, ingest4
    from tests.conftest import Broker

    exe = _py_spy() if spy else ""
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="runwatch-profile-"))
    broker = Broker(log_dir=tmp).start()
    w = _worker(broker, tmp / "worker", "prof.")
    try:
        env = _env(tmp / "sdk", broker.bootstrap, "prof.", w.api_url)
        total = runs * 10 * 1000
        console.print(f"profiling the ingest of {total:,} points from 4 processes "
                      + ("(py-spy, 100 samples/s)" if spy else "(no profiler attached)"))
        spies: list[subprocess.Popen] = []

        def attach(procs) -> None:  # py-spy samples the worker and the first trainer from outside
            spies.extend(_record(exe, w.proc.pid, "worker", 30) + _record(exe, procs[0].pid, "trainer", 30))

        e2e, cpu = ingest4(broker, w, env, runs, started=attach if spy else None)
        for s in spies:
            _, err = s.communicate(timeout=120)
            if s.returncode and b"Permission" in err:
                raise SystemExit("py-spy may not attach to processes here (ptrace is not permitted)")
        console.print(f"{total / e2e:,.0f} points/s end to end ({e2e:.1f} s); CPU a point: "
                      + ", ".join(f"{k} {v / total * 1e6:.2f} µs" for k, v in cpu.items()))
        for name in ("worker", "trainer") if spy else ():
            console.rule(f"{name}: share of busy samples each frame was on the stack of")
            for share, frame in summarize(OUT / f"{name}.txt"):
                console.print(f"  {share:5.1f}%  {frame}", highlight=False)
        if spy:
            console.print(f"\nflame graphs: {OUT / 'worker.svg'}, {OUT / 'trainer.svg'}")
    finally:
        w.stop()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # the stores of 10 M points: left in /tmp, they fill the disk
    return 0


if __name__ == "__main__":
    sys.exit(main())

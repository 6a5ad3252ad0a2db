"""The benchmark command itself runs: one small group end to end, on its own embedded broker, its results
written where asked. Its figures are not judged here (performance is measured by `./dev bench`, not asserted
in tests): only that every figure the group promises is there, a finite positive number, and that the
Markdown table says the same as the JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import ROOT

SDK_FIGURES = {
    "log() p50, broker up", "log() p99, broker up", "list.append floor p50", "log() p50 / floor p50",
    "log() p50, broker down (spooling)", "log() p99, broker down (spooling)", "log() p50 / floor p50, broker down",
    "points/s logged for 3 s, one process", "points/s kept and acknowledged by the broker, same run",
    "max RSS after 2,000,000 points, broker down, 64 MiB spool",
}


def test_the_benchmark_command_runs_a_group_and_writes_its_results(tmp_path):
    out = tmp_path / "results"
    committed = ROOT / "benchmarks" / "results" / "latest.md"
    before = committed.read_bytes() if committed.exists() else None
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "sdk", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((out / "latest.json").read_text())
    assert data["meta"]["quick"] is True and data["meta"]["cpus"] >= 1
    by_name = {r["name"]: r for r in data["results"]}
    assert set(by_name) == SDK_FIGURES
    for r in data["results"]:
        assert isinstance(r["value"], (int, float)) and math.isfinite(r["value"]) and r["value"] > 0, r
    # a ratio is the quotient of the figures it names, from the same run
    ratio = by_name["log() p50 / floor p50"]["value"]
    assert math.isclose(ratio, by_name["log() p50, broker up"]["value"] / by_name["list.append floor p50"]["value"])
    md = (out / "latest.md").read_text().splitlines()
    rows = [line for line in md if line.startswith("| ") and not line.startswith("| figure")]
    assert [row.split(" | ")[0][2:] for row in rows] == [r["name"] for r in data["results"]]
    # the figures print as they are measured (the progress a user watches)
    assert "log() p50, broker up" in proc.stdout
    # nothing was written over the committed results
    assert (committed.read_bytes() if committed.exists() else None) == before

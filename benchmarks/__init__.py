"""runwatch's benchmarks: `python -m benchmarks [--quick]`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_json(code: str, *args, env: dict[str, str] | None = None, python: str = sys.executable,
             timeout: float = 600, what: str = "benchmark child") -> dict:
    """Run a measurement in a fresh process (its own emitter, its own GC state); it prints one JSON line last."""
    out = subprocess.run([python, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])

"""Side-by-side with MLflow: the same workloads, MLflow in its own venv (.venv-mlflow: MLflow pins an
older pyarrow than runwatch), run as child processes of the benchmark."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks import ROOT, run_json

VENV = ROOT / ".venv-mlflow"
MLFLOW_VERSION = "3.17.2"

PER_CALL = r'''
import json, os, sys, time, statistics, logging
logging.disable(logging.WARNING)
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
import mlflow
uri, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
mlflow.set_tracking_uri(uri)
mlflow.set_experiment("per-call")
lat = []
with mlflow.start_run():
    for i in range(n):
        t = time.perf_counter_ns()
        mlflow.log_metric("loss", i * 0.001, step=i, synchronous=(mode != "async"))
        lat.append(time.perf_counter_ns() - t)
    if mode == "async":
        t = time.perf_counter()
        mlflow.flush_async_logging()
        drain = time.perf_counter() - t
    else:
        drain = 0.0
lat.sort()
print(json.dumps({"p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99)], "n": n, "drain_s": drain}))
'''

LOG_BATCH = r'''
import json, os, sys, time, logging
logging.disable(logging.WARNING)
import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
uri, runs, metrics, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
mlflow.set_tracking_uri(uri)
client = MlflowClient()
exp = client.create_experiment("ingest")
ids = []
t0 = time.perf_counter()
now = int(time.time() * 1000)
for r in range(runs):
    run = client.create_run(exp)
    ids.append(run.info.run_id)
    batch = []
    for s in range(steps):
        for m in range(metrics):
            batch.append(Metric(f"m{m}", float(s) / (m + 1), now, s))
            if len(batch) == 1000:      # MLflow's per-call limit
                client.log_batch(run.info.run_id, metrics=batch)
                batch = []
    if batch:
        client.log_batch(run.info.run_id, metrics=batch)
    client.set_terminated(run.info.run_id)
ingest = time.perf_counter() - t0
# query: last value of m0 across the runs (search_runs), min and max from each run's history
lat = []
for _ in range(5):
    t = time.perf_counter()
    found = client.search_runs([exp], max_results=runs)
    last = {x.info.run_id: x.data.metrics.get("m0") for x in found}
    mins = {i: min(m.value for m in client.get_metric_history(i, "m0")) for i in ids}
    lat.append(time.perf_counter() - t)
lat.sort()
size = os.path.getsize(uri.replace("sqlite:///", "")) if uri.startswith("sqlite") else 0
print(json.dumps({"points": runs * metrics * steps, "seconds": ingest, "query_p50": lat[len(lat) // 2],
                  "query_max": lat[-1], "runs": runs, "bytes": size}))
'''


def ensure_venv(progress) -> Path:
    py = VENV / "bin" / "python"
    stamp = VENV / f".mlflow-{MLFLOW_VERSION}"
    if not stamp.exists():
        progress(f"installing MLflow {MLFLOW_VERSION} into {VENV.name} (once)")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        f"mlflow=={MLFLOW_VERSION}"], check=True)
        stamp.touch()
    return py


def run_child(py: Path, code: str, *args: str, timeout: float = 1800) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return run_json(code, *args, env=env, python=str(py), timeout=timeout, what="MLflow benchmark child")


BANDWIDTH = r'''
import json, time, numpy as np
a = np.ones(64 << 20)             # 512 MiB
b = np.empty_like(a)
best = 0.0
for _ in range(5):
    t = time.perf_counter(); np.copyto(b, a); dt = time.perf_counter() - t
    best = max(best, 2 * a.nbytes / dt)  # read + write
print(json.dumps({"bytes_per_s": best}))
'''

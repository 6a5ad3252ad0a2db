"""The sample training `runwatch demo` submits: a logistic regression on synthetic data, one per rank.

Started by the launcher, each process finds its run with Run.get_context(); every rank logs
into a child run of its own, rank 0 also logs the run-level summary. No ML framework needed.
"""

import os
import sys
import time

import numpy as np

from runwatch import Run

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
rank = int(os.environ.get("RANK", "0"))
world = int(os.environ.get("WORLD_SIZE", "1"))
run = Run.get_context()
print(f"rank {rank} of {world}: {steps} steps, run {run.id}")

rng = np.random.default_rng(rank)
x = rng.normal(size=(2048, 8))
w_true = rng.normal(size=8)
y = (x @ w_true + 0.3 * rng.normal(size=2048) > 0).astype(float)
w = np.zeros(8)
lr = 0.5 / (rank + 1)

with run.child_run(name=f"rank-{rank}", run_id=f"{run.id}_rank{rank}") as child:
    child.tag("rank", str(rank))
    child.add_properties({"learning_rate": str(lr)})
    child.log("learning_rate", lr)
    child.log("optimizer", "sgd")
    for step in range(steps):
        p = 1 / (1 + np.exp(-(x @ w)))
        loss = float(-np.mean(y * np.log(p + 1e-9) + (1 - y) * np.log(1 - p + 1e-9)))
        acc = float(np.mean((p > 0.5) == y))
        w -= lr * x.T @ (p - y) / len(y)
        child.log("loss", loss)
        child.log("accuracy", acc)
        if step % 25 == 0:
            child.log_row("weight norm", step=step, norm=float(np.linalg.norm(w)))
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss:.4f}  accuracy {acc:.3f}")
        time.sleep(0.01)
    child.log_list("final weights", w)
    edges = np.linspace(0, 1, 11)
    hist, _ = np.histogram(p, bins=edges)
    child.log_table("calibration", {"bin": edges[:-1].tolist(), "count": hist.tolist()})
    if rank == 0:
        run.log("world_size", world)
        run.log("final_loss_rank0", loss)
print(f"rank {rank} done: loss {loss:.4f}, accuracy {acc:.3f}", file=sys.stderr)

"""`runwatch demo`: the stack, plus a sample 2-process training run that logs every metric kind, shown live."""

from __future__ import annotations

import math
import multiprocessing as mp
import time

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from .settings import Settings

WORKERS = 2


def train(parent_id: str, experiment: str, rank: int, steps: int, home: str) -> None:
    """A tiny logistic regression on synthetic data: no ML framework needed."""
    from producers.run import Experiment, Run, Workspace

    ws = Workspace.from_config(home=home)
    exp = Experiment(ws, experiment)
    parent = Run(exp, parent_id, _fetch=False)
    rng = np.random.default_rng(rank)
    x = rng.normal(size=(2048, 8))
    w_true = rng.normal(size=8)
    y = (x @ w_true + 0.3 * rng.normal(size=2048) > 0).astype(float)
    w = np.zeros(8)
    lr = 0.5 / (rank + 1)
    with parent.child_run(name=f"rank-{rank}", run_id=f"{parent_id}_rank{rank}") as run:
        run.tag("rank", str(rank))
        run.add_properties({"learning_rate": str(lr)})
        run.log("learning_rate", lr)
        run.log("optimizer", "sgd")
        for step in range(steps):
            p = 1 / (1 + np.exp(-(x @ w)))
            loss = float(-np.mean(y * np.log(p + 1e-9) + (1 - y) * np.log(1 - p + 1e-9)))
            w -= lr * x.T @ (p - y) / len(y)
            run.log("loss", loss)
            run.log("accuracy", float(np.mean((p > 0.5) == y)))
            if step % 25 == 0:
                run.log_row("weight norm", step=step, norm=float(np.linalg.norm(w)))
            time.sleep(0.01)
        run.log_list("final weights", w)
        edges = np.linspace(0, 1, 11)
        hist, _ = np.histogram(p, bins=edges)
        run.log_table("calibration", {"bin": edges[:-1].tolist(), "count": hist.tolist()})


def run_demo(settings: Settings, steps: int, console: Console, keep: bool = True) -> int:
    from producers.run import Experiment, Workspace

    from .client import RunwatchError
    from .stack import StackError, down, up

    try:
        with console.status("starting runwatch") as st:
            result = up(settings, progress=lambda s: st.update(s))
    except StackError as exc:
        console.print(f"[red]the stack did not start:[/red] {exc}")
        return 1
    console.print(f"runwatch is up in {result.seconds:.1f} s: broker {result.record['bootstrap_servers']}, "
                  f"read API {result.record['api_url']}, data in {settings.home}")
    ws = Workspace.from_config(home=str(settings.home))
    exp = Experiment(ws, "sample")
    parent = exp.start_logging(display_name="sample training")
    parent.tag("demo")
    parent.flush()
    console.print(f"sample run {parent.id}: {WORKERS} training processes, {steps} steps each\n")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=train, args=(parent.id, exp.name, r, steps, str(settings.home)))
             for r in range(WORKERS)]
    for p in procs:
        p.start()
    try:
        with Live(console=console, refresh_per_second=4) as live:
            while any(p.is_alive() for p in procs):
                live.update(_live_table(exp, parent.id, steps))
                time.sleep(0.5)
            for p in procs:
                p.join()
            parent.complete()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                table, done = _live_table(exp, parent.id, steps, final=True)
                live.update(table)
                if done and parent.get_status() == "Completed":
                    break
                time.sleep(0.3)
    except RunwatchError as exc:
        console.print(f"[red]{exc}[/red]")
        return 1
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        console.print(f"[red]a training process failed (exit codes {failed})[/red]")
        return 1
    console.print()
    child = f"{parent.id}_rank0"
    metrics = ws._api().get(f"/api/runs/{child}/metrics")
    console.print(f"[bold]get_metrics() of {child}[/bold]")
    for name, value in metrics.items():
        console.print(f"  {name:>15}: {_short(value)}", highlight=False)
    console.print("\n[bold]Where to look next[/bold]")
    home = f" --home {settings.home}" if "RUNWATCH_HOME" not in __import__("os").environ else ""
    console.print(f"  runwatch runs list --experiment sample --children{home}")
    console.print(f"  runwatch runs list --experiment sample --children --metric loss --sort min{home}")
    console.print(f"  runwatch metrics {child}{home}")
    console.print(f"  runwatch runs show {parent.id}{home}")
    console.print(f"  {parent.get_portal_url()}   (the run's page)")
    if keep:
        console.print("The stack keeps running; stop it with `runwatch down`.")
    else:
        down(settings)
    return 0


def _live_table(exp, parent_id: str, steps: int, final: bool = False):
    runs = exp.workspace._api().get("/api/runs", parent=parent_id, metric=["loss", "accuracy"])
    t = Table(title=f"experiment {exp.name} / run {parent_id}")
    for col in ("run", "status", "steps", "loss (last)", "loss (min)", "accuracy (last)"):
        t.add_column(col)
    done = len(runs) == WORKERS
    for r in runs:
        m = r.get("metrics", {})
        loss, acc = m.get("loss", {}), m.get("accuracy", {})
        t.add_row(r["run_id"][-6:], r["status"], f"{loss.get('count', 0)}/{steps}", _f(loss.get("last")),
                  _f(loss.get("min")), _f(acc.get("last")))
        done = done and r["status"] == "Completed" and loss.get("count", 0) == steps
    return (t, done) if final else t


def _f(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _short(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_f(x) if isinstance(x, float) else str(x) for x in v[:5]) + (", …]" if len(v) > 5 else "]") + f" ({len(v)} values)"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(c)}" for k, c in v.items()) + "}"
    return _f(v) if isinstance(v, float) else str(v)

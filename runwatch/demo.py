"""`runwatch demo`: the stack, plus the sample training submitted as a 2-process run, shown live."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .core.client import run_path
from .core.settings import Settings
from .core.states import TERMINAL, WAITING

PROCESSES = 2
SAMPLES = Path(__file__).resolve().parent / "samples"


def run_demo(settings: Settings, steps: int, console: Console, keep: bool = True) -> int:
    from runwatch.producers.config import ScriptRunConfig
    from runwatch.producers.run import Experiment, Workspace
    from runwatch.producers.watch import OutputFollower

    from .core.errors import RunwatchError
    from .stack import StackError, down, up

    try:
        with console.status("starting runwatch") as st:
            result = up(settings, progress=lambda s: st.update(s))
    except StackError as exc:
        console.print(f"[red]the stack did not start:[/red] {exc}")
        return 1
    # commands, ids and paths are printed whole, never wrapped by us (a terminal folds a long line for the
    # eye; copying it gives the line back): soft_wrap
    state = f"up in {result.seconds:.1f} s" if result.started else "already running"
    console.print(f"runwatch is {state}: broker {result.record['bootstrap_servers']}, "
                  f"read API {result.record['api_url']}, data in {settings.home}", highlight=False, soft_wrap=True)
    ws = Workspace(settings=settings)
    exp = Experiment(ws, "sample")
    config = ScriptRunConfig(source_directory=str(SAMPLES), script="train.py", arguments=[steps],
                             process_count_per_node=PROCESSES)
    run = exp.submit(config, tags={"demo": None})
    console.print(f"submitted run {run.id}: {PROCESSES} processes of samples/train.py, {steps} steps each "
                  "(the same as `runwatch submit --procs 2 train.py`); Ctrl-C stops watching, the run goes on\n",
                  highlight=False, soft_wrap=True)

    class Lines:  # the driver logs, as they arrive, go above the live table
        def write(self, text: str) -> None:
            for line in text.splitlines():
                console.print(Text(line), highlight=False, soft_wrap=True)

        def flush(self) -> None:
            pass

    follower = OutputFollower(ws.read_api(), run.id, Lines())
    status = "Queued"
    try:
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            deadline = time.monotonic() + max(120, steps * 0.2)
            while time.monotonic() < deadline:
                try:
                    status = run.get_status()
                except RunwatchError:
                    status = "Queued"  # on its way through the pipeline
                if status not in WAITING:
                    follower.poll()
                live.update(_live_view(exp, run.id, status, steps))
                if status in TERMINAL and _children_done(exp, run.id, steps):
                    break
                time.sleep(0.5)
            follower.finish(run.get_details())
            live.update(_live_view(exp, run.id, status, steps))
    except RunwatchError as exc:
        console.print(f"[red]{exc}[/red]")
        return 1
    except KeyboardInterrupt:
        console.print(f"\nstopped watching; the run goes on. Follow it with `runwatch logs {run.id} --follow`, "
                      f"cancel it with `runwatch cancel {run.id}`", highlight=False, soft_wrap=True, markup=False)
        return 130
    if status != "Completed":
        err = run.get_details().get("error") or {}
        console.print(f"[red]the sample run ended {status}: {err.get('message', '')}[/red]")
        return 1
    console.print()
    child = f"{run.id}_rank0"
    metrics = ws.read_api().get(run_path(child, "metrics"))
    console.print(f"[bold]get_metrics() of {child}[/bold]")
    for name, value in metrics.items():
        console.print(f"  {name:>15}: {_short(value)}", highlight=False)
    console.print("\n[bold]Where to look next[/bold]")
    home = f" --home {settings.home}" if "RUNWATCH_HOME" not in os.environ else ""
    for cmd in (f"runwatch files {run.id}", f"runwatch logs {run.id} --file azureml-logs/55_azureml-execution-0.txt",
                "runwatch runs list --experiment sample --children --metric loss --sort min",
                f"runwatch runs show {run.id}", "runwatch clusters",
                f"runwatch submit -e sample --procs 2 --source-dir {SAMPLES} train.py 100"):
        console.print(f"  {cmd}{home}", highlight=False, soft_wrap=True, markup=False)
    console.print(f"  {run.get_portal_url()}   (the run's page)", highlight=False, soft_wrap=True, markup=False)
    if keep:
        console.print("The stack keeps running; stop it with `runwatch down`.")
    else:
        from runwatch.producers.emitter import close_all

        close_all()  # this process's producer goes first: left open, it would complain of the broker going away
        down(settings)
    return 0


def _children(exp, run_id: str) -> list[dict]:
    return exp.workspace.read_api().get("/api/runs", parent=run_id, metric=["loss", "accuracy"])


def _children_done(exp, run_id: str, steps: int) -> bool:
    kids = _children(exp, run_id)
    return len(kids) == PROCESSES and all(
        k["status"] == "Completed" and k.get("metrics", {}).get("loss", {}).get("count") == steps for k in kids)


def _live_view(exp, run_id: str, status: str, steps: int):
    t = Table(title=f"experiment {exp.name} / run {run_id}: [bold]{status}[/bold]")
    for col in ("child run", "status", "steps", "loss (last)", "loss (min)", "accuracy (last)"):
        t.add_column(col, no_wrap=True)
    try:
        kids = _children(exp, run_id)
    except Exception:
        kids = []
    for r in kids:
        m = r.get("metrics", {})
        loss, acc = m.get("loss", {}), m.get("accuracy", {})
        t.add_row(r["display_name"] or r["run_id"], r["status"], f"{loss.get('count', 0)}/{steps}",
                  _f(loss.get("last")), _f(loss.get("min")), _f(acc.get("last")))
    return Group(t)


def _f(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _short(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_f(x) if isinstance(x, float) else str(x) for x in v[:5]) + (", …]" if len(v) > 5 else "]") + f" ({len(v)} values)"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(c)}" for k, c in v.items()) + "}"
    return _f(v) if isinstance(v, float) else str(v)

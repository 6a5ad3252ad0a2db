"""The `runwatch` command line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Column, Table

from .core.client import ApiClient, run_path
from .core.errors import MissingExtra, NotFound, RunwatchError, StackMismatch, StackNotRunning
from .core.names import SCRIPT_RUN
from .core.settings import Settings
from .core.states import TERMINAL

app = typer.Typer(help="runwatch: self-hosted run monitoring for machine-learning training.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
runs_app = typer.Typer(help="List and show runs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
dash_app = typer.Typer(help="Grafana dashboards and alert rules (the studio of the server deployment).",
                       no_args_is_help=True)
app.add_typer(dash_app, name="dashboards")
console = Console()
err = Console(stderr=True)

HomeOpt = typer.Option(None, "--home", help="RUNWATCH_HOME (default: $RUNWATCH_HOME or ~/.runwatch).")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of a table.")


def _settings(home: Optional[Path]) -> Settings:
    return Settings.load(home=home)


def _client(home: Optional[Path]) -> ApiClient:
    return ApiClient(_settings(home))


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def _fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _call(fn):
    try:
        return fn()
    except (StackNotRunning, StackMismatch) as exc:
        _fail(str(exc), 3)
    except NotFound as exc:
        _fail(str(exc), 4)
    except RunwatchError as exc:
        _fail(str(exc))


# ------------------------------------------------------------------------------ the stack
@app.command()
def up(home: Optional[Path] = HomeOpt) -> None:
    """Start the embedded stack (broker, worker with processors, sink and read API) and wait until it is ready."""
    from .stack import StackError
    from .stack import up as stack_up

    settings = _settings(home)
    try:
        with console.status("starting runwatch") as st:
            result = stack_up(settings, progress=lambda s: st.update(s))
    except (StackError, RunwatchError) as exc:
        _fail(str(exc), 2 if isinstance(exc, MissingExtra) else 1)
    rec = result.record
    what = ", ".join(result.started) if result.started else "nothing (already running)"
    console.print(f"runwatch is up in {result.seconds:.1f} s (started: {what})")
    console.print(f"  broker    {rec['bootstrap_servers']}   (Tansu, in memory)")
    console.print(f"  read API  {rec['api_url']}")
    console.print(f"  data      {settings.home}")
    console.print("Stop it with `runwatch down`; see its health with `runwatch status`.")


@app.command()
def down(home: Optional[Path] = HomeOpt,
         force: bool = typer.Option(False, "--force", help="Do not wait for the worker: save what it has not stored."),
         timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait for the worker to store everything.")
         ) -> None:
    """Stop the embedded stack, once the worker has stored what the broker holds (or it is saved to disk)."""
    from .stack import StackError
    from .stack import down as stack_down

    try:
        with console.status("stopping runwatch") as st:
            result = stack_down(_settings(home), force=force, timeout=timeout, progress=lambda s: st.update(s))
    except StackError as exc:
        _fail(str(exc))
    if result.saved_to:
        console.print(f"the worker had not stored {result.unstored_events:,} event(s) ({result.unstored_points:,} "
                      f"points): saved to {result.saved_to}; the next `runwatch up` sends them", highlight=False)
    console.print(f"stopped: {', '.join(result.stopped)} in {result.seconds:.1f} s" if result.stopped
                  else "nothing was running", highlight=False)


@app.command()
def status(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Health of each part, consumer lag and row counts."""
    from .stack import status as stack_status

    settings = _settings(home)
    info = stack_status(settings)
    if as_json:
        _print_json(info)
        raise typer.Exit(0 if info["running"] else 3)
    if not info["recorded"] and not info["worker"]["health"]:
        _fail(f"the stack is not running under {settings.home}. Start it with `runwatch up`.", 3)
    h = info["worker"]["health"] or {}
    t = Table(title=f"runwatch at {settings.home}")
    t.add_column("part")
    t.add_column("state")
    t.add_column("details")
    t.add_row("broker", _ok(info["broker"]["alive"]), f"{info['broker']['address']} pid {info['broker']['pid']}")
    t.add_row("worker", _ok(bool(h)), f"{info['worker']['api_url']} pid {info['worker']['pid']}")
    if h:
        p, s = h["processors"], h["sink"]
        t.add_row("processors", _ok(p["ready"]), f"events {p['events']}, dead letters {p['dead_letters']}")
        lag = sum(s["lag"].values())
        t.add_row("sink", _ok(s["ready"] and not s["error"]),
                  f"lag {lag} messages, batches {s['batches']}" + (f", error: {s['error']}" if s["error"] else ""))
        t.add_row("ClickHouse", _ok("clickhouse_error" not in h),
                  ", ".join(f"{k} {v}" for k, v in h.get("rows", {}).items()))
    console.print(t)
    raise typer.Exit(0 if info["running"] else 3)


def _ok(flag: bool) -> str:
    return "[green]ok[/green]" if flag else "[red]down[/red]"


@app.command(hidden=True)
def worker() -> None:
    """Run the worker process in the foreground (what `runwatch up` starts)."""
    from .worker import run

    run(Settings.load())


@app.command()
def sync(home: Optional[Path] = HomeOpt) -> None:
    """Send spooled events (from offline runs, or processes that ended while the broker was away)."""
    from runwatch.producers.sync import sync_spools

    settings = _settings(home)
    try:
        result = sync_spools(settings)
    except RunwatchError as exc:
        _fail(str(exc), 3)
    console.print(f"sent {result['events']} events from {result['spools']} spool(s); "
                  f"{result['busy']} still owned by a running process")


# ------------------------------------------------------------------------------ reading
@app.command()
def experiments(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Every experiment with its runs by status and its latest activity."""
    rows = _call(lambda: _client(home).get("/api/experiments"))
    if as_json:
        return _print_json(rows)
    t = Table("experiment", "runs", "by status", "latest activity")
    for r in rows:
        t.add_row(r["name"], str(r["runs"]), ", ".join(f"{k} {v}" for k, v in r["by_status"].items()),
                  str(r["latest_activity"]))
    console.print(t)


@runs_app.command("list")
def runs_list(experiment: Optional[str] = typer.Option(None, "--experiment", "-e"),
              status_: Optional[list[str]] = typer.Option(None, "--status", help="Repeat for several."),
              tag: Optional[list[str]] = typer.Option(None, "--tag", help="NAME or NAME=VALUE; repeat for several."),
              metric: Optional[str] = typer.Option(None, "--metric", help="Show (and sort by) this metric."),
              sort: str = typer.Option("min", "--sort", help="min, max or last: which aggregate sorts the runs."),
              descending: bool = typer.Option(False, "--desc", help="Largest first."),
              include_children: bool = typer.Option(False, "--children", help="Include child runs."),
              limit: int = typer.Option(100, "--limit"),
              home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Runs, newest first, or sorted by a metric's min, max or last value (`--metric loss --sort min`)."""
    if sort not in ("min", "max", "last"):
        _fail(f"--sort must be min, max or last, not {sort!r}", 2)
    params = dict(experiment=experiment, status=status_ or None, tag=tag or None, limit=limit,
                  include_children=str(include_children).lower())
    if metric:
        params.update(sort_metric=metric, sort=sort, order="desc" if descending else "asc", metric=metric)
    rows = _call(lambda: _client(home).get("/api/runs", **params))
    if as_json:
        return _print_json(rows)
    t = Table("experiment", "status", "started (UTC)", "duration s", *([f"{metric} {sort}"] if metric else []))
    t.columns.insert(0, Column("run", overflow="fold", min_width=20))
    for r in rows:
        extra = []
        if metric:
            m = (r.get("metrics") or {}).get(metric)
            extra = [_num(m.get(sort)) if m else ""]
        t.add_row(r["run_id"], r["experiment"], r["status"], (r["start_time"] or "")[:19].replace("T", " "),
                  _num(r["duration_s"]), *extra)
    console.print(t)


def _num(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.6g}"
    return str(x)


@runs_app.command("show")
def runs_show(run_id: str, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """One run's details: status, times, tags, properties, error, children."""
    client = _client(home)
    run = _call(lambda: client.get(run_path(run_id)))
    run["children"] = _call(lambda: client.get(run_path(run_id, "children")))
    run["history"] = _call(lambda: client.get(run_path(run_id, "history")))
    if as_json:
        return _print_json(run)
    for k in ("run_id", "experiment", "display_name", "status", "start_time", "end_time", "duration_s",
              "parent_run_id", "tags", "properties", "error", "dropped_points"):
        console.print(f"[bold]{k:>15}[/bold]  {run.get(k)}", highlight=False)
    if run["children"]:
        console.print("       children  " + ", ".join(f"{c['run_id']} ({c['status']})" for c in run["children"]))
    console.print("        history  " + " -> ".join(h["to"] + ("" if h["applied"] else " (rejected)")
                                                    for h in run["history"]))


@app.command()
def metrics(run_id: str, name: Optional[str] = typer.Option(None, "--name", "-n"),
            recursive: bool = typer.Option(False, "--recursive", help="Include child runs."),
            home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """A run's metrics in the get_metrics() shape."""
    data = _call(lambda: _client(home).get(run_path(run_id, "metrics"), name=name,
                                           recursive=str(recursive).lower()))
    if as_json:
        return _print_json(data)
    _print_metrics(data)


def _print_metrics(data: dict[str, Any]) -> None:
    t = Table("metric", "value")
    for k, v in data.items():
        if isinstance(v, dict):
            text = "; ".join(f"{c}: {_short(vals)}" for c, vals in v.items())
        else:
            text = _short(v)
        t.add_row(k, text)
    console.print(t)


def _short(v: Any, n: int = 8) -> str:
    if isinstance(v, list):
        shown = ", ".join(_num(x) for x in v[:n])
        return f"[{shown}{', …' if len(v) > n else ''}] ({len(v)} values)"
    return _num(v)


# ------------------------------------------------------------------------------ submitted runs
def _workspace(home: Optional[Path]):
    from runwatch.producers.run import Workspace

    return Workspace(settings=_settings(home))


@app.command(context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
def submit(script: str = typer.Argument(..., help="The script to run, relative to --source-dir."),
           args: Optional[list[str]] = typer.Argument(None, help="Arguments passed to the script."),
           experiment: str = typer.Option(..., "--experiment", "-e", help="The experiment's name."),
           nodes: int = typer.Option(1, "--nodes", help="node_count: how many nodes to start."),
           procs: int = typer.Option(1, "--procs", help="process_count_per_node: processes per node."),
           compute: str = typer.Option("local", "--compute", help="The compute target (setting compute_targets)."),
           source_dir: Path = typer.Option(Path("."), "--source-dir", help="Snapshotted and run from there."),
           env: Optional[list[str]] = typer.Option(None, "--env", help="NAME=VALUE for the script; repeat."),
           no_wait: bool = typer.Option(False, "--no-wait", help="Print the run id and return at once."),
           home: Optional[Path] = HomeOpt) -> None:
    """Submit SCRIPT as a run: wait for it and show its output (options go before SCRIPT)."""
    from runwatch.producers.config import ConfigError, ScriptRunConfig
    from runwatch.producers.run import Experiment
    from runwatch.producers.snapshot import SnapshotError
    from runwatch.producers.watch import RunFailedError

    variables = {}
    for item in env or []:
        k, eq, v = item.partition("=")
        if not eq or not k:
            _fail(f"--env {item!r}: give NAME=VALUE", 2)
        variables[k] = v
    try:
        exp = Experiment(_workspace(home), experiment)
        config = ScriptRunConfig(source_directory=str(source_dir), script=script, arguments=list(args or []),
                                 compute_target=compute, node_count=nodes, process_count_per_node=procs,
                                 environment_variables=variables)
        run = exp.submit(config)
    except (ConfigError, SnapshotError, RunwatchError, ValueError) as exc:
        _fail(str(exc), 2)
    if no_wait:
        typer.echo(run.id)
        return
    try:
        details = run.wait_for_completion(show_output=True)
    except RunFailedError:
        raise typer.Exit(1)
    except KeyboardInterrupt:
        err.print(f"stopped watching; the run goes on. Cancel it with `runwatch cancel {run.id}`")
        raise typer.Exit(130)
    raise typer.Exit(0 if details["status"] == "Completed" else 1)


@app.command()
def cancel(run_id: str, home: Optional[Path] = HomeOpt) -> None:
    """Cancel a run; a submitted run's launcher stops every one of its processes."""
    from runwatch.producers.run import Run

    run = _call(lambda: Run.get(_workspace(home), run_id))
    was = run.status
    if was in TERMINAL:
        _fail(f"run {run_id} is already {was}")
    run.cancel()
    console.print(f"cancel requested for {run_id} (it was {was}); its launcher stops its processes"
                  if run.run_type == SCRIPT_RUN else f"run {run_id} canceled (it was {was})")


@app.command()
def files(run_id: str, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Every file of a run: its log files (azureml-logs/, logs/) and stored files."""
    rows = _call(lambda: _client(home).get(run_path(run_id, "files")))
    if as_json:
        return _print_json(rows)
    t = Table(Column("file", overflow="fold"), "kind", "lines", "bytes", "last written (UTC)")
    for f in rows:
        t.add_row(f["name"], f["kind"], str(f.get("lines", "")), str(f.get("bytes", f.get("size", ""))),
                  (f.get("last_ts") or "")[:19].replace("T", " "))
    console.print(t)


@app.command()
def download(run_id: str, name: str = typer.Argument(..., help="A file of the run (see `runwatch files`)."),
             output: Optional[Path] = typer.Option(None, "--output", "-o", help="File or directory (default: here)."),
             home: Optional[Path] = HomeOpt) -> None:
    """Download one file of a run (a stored file, an output or a log file)."""
    from runwatch.producers.files import download as fetch

    target, n = _call(lambda: fetch(_client(home), run_id, name, output))
    console.print(f"{name} -> {target} ({n} bytes)", highlight=False)


@app.command()
def logs(run_id: str, file: Optional[list[str]] = typer.Option(None, "--file", "-f",
                                                              help="A log file (see `runwatch files`); repeat."),
         follow: bool = typer.Option(False, "--follow", help="Keep printing new lines until the run ends."),
         tail: Optional[int] = typer.Option(None, "--tail", help="Start with the last N lines."),
         home: Optional[Path] = HomeOpt) -> None:
    """Print a run's log files (default: the driver logs of every process); --follow keeps going."""
    import time

    from runwatch.producers.watch import OutputFollower, driver_files

    client = _client(home)
    deadline = time.monotonic() + (30 if follow else 0)
    while True:  # with --follow, a run submitted a moment ago may still be on its way
        try:
            listed = client.get(run_path(run_id, "files"))
            client.get(run_path(run_id))
            break
        except NotFound:
            if time.monotonic() > deadline:
                _call(lambda: client.get(run_path(run_id)))
            time.sleep(0.3)
        except RunwatchError:
            listed = _call(lambda: client.get(run_path(run_id, "files")))
    names = {f["name"] for f in listed}
    chosen = list(file) if file else None
    for f in chosen or []:
        if f not in names and not follow:
            _fail(f"run {run_id} has no log file {f!r}; it has: {', '.join(sorted(names)) or 'none yet'}", 4)
    out = typer.get_text_stream("stdout")
    follower = OutputFollower(client, run_id, out, chosen)
    if tail is not None:
        for f in chosen or driver_files(listed):
            page = client.get(run_path(run_id, "logs"), file=f, tail=tail)
            follower.cursor[f] = page["lines"][0]["seq"] - 1 if page["lines"] else -1
    try:
        while True:
            _call(follower.poll)
            if not follow:
                return
            status = _call(lambda: client.get(run_path(run_id)))["status"]
            if status in TERMINAL:
                time.sleep(1.0)  # the last lines may still be on their way
                _call(follower.poll)
                return
            time.sleep(0.5)
    except KeyboardInterrupt:
        raise typer.Exit(130)


@app.command()
def clusters(name: Optional[str] = typer.Argument(None, help="One compute target."),
             home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Compute targets with their slots and their queued and running runs."""
    client = _client(home)
    rows = _call(lambda: [client.get(f"/api/compute/{name}")] if name else client.get("/api/compute"))
    if as_json:
        return _print_json(rows)
    for c in rows:
        console.print(f"[bold]{c['name']}[/bold]: {c['slots_in_use']} of {c['slots'] or '?'} process slots in use, "
                      f"{len(c['running'])} running, {len(c['queued'])} queued", highlight=False)
        if c["running"] or c["queued"]:
            t = Table(Column("run", overflow="fold"), "experiment", "status", "processes", "since (UTC)")
            for r in c["running"] + c["queued"]:
                t.add_row(r["run_id"], r["experiment"], r["status"], str(r["processes"]),
                          ((r["start_time"] or r["created_time"]) or "")[:19].replace("T", " "))
            console.print(t)


# ------------------------------------------------------------------------------ Grafana
ApiUrlOpt = typer.Option(None, "--api-url", help="Where Grafana's browsers reach the read API (run images).")


@dash_app.command("export")
def dashboards_export(directory: Path = typer.Argument(..., help="Written: generated/*.json and provisioning/."),
                      api_url: Optional[str] = ApiUrlOpt) -> None:
    """Write the dashboards' JSON and Grafana's provisioning files (datasource, dashboards, alert rules)."""
    from runwatch.dashboards.export import write

    total, written = write(directory, api_url)
    console.print(f"{total} files under {directory}: {len(written)} written, "
                  f"{total - len(written)} already current", highlight=False)


@dash_app.command("push")
def dashboards_push(grafana: str = typer.Option(..., "--grafana", help="Grafana's URL, e.g. http://localhost:3000"),
                    token: Optional[str] = typer.Option(None, "--token", envvar="GRAFANA_TOKEN",
                                                        help="A service account token (or $GRAFANA_TOKEN)."),
                    api_url: Optional[str] = ApiUrlOpt,
                    webhook_url: Optional[str] = typer.Option(None, "--webhook-url",
                                                              help="Also create or update the alert webhook.")) -> None:
    """Create or update the dashboards and alert rules in a running Grafana (safe to repeat)."""
    from runwatch.dashboards.push import push

    try:
        result = push(grafana, token, api_url, webhook_url)
    except MissingExtra as exc:
        _fail(str(exc), 2)
    except Exception as exc:  # grafana-client raises several unrelated types
        _fail(f"pushing to {grafana} failed: {type(exc).__name__}: {exc}")
    console.print(f"pushed {result['dashboards']} dashboards and {result['alert_rules']} alert rules to {grafana}")


@app.command()
def demo(home: Optional[Path] = HomeOpt, steps: int = typer.Option(300, help="Training steps of the sample run."),
         keep: bool = typer.Option(True, help="Leave the stack running afterwards.")) -> None:
    """Bring the stack up and run a sample training that logs every metric kind, shown live."""
    from .demo import run_demo

    code = run_demo(_settings(home), steps=steps, console=console, keep=keep)
    raise typer.Exit(code)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

"""The `runwatch` command line (docs/cli.md: output, --json, exit codes)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
import typer.core

from . import __version__
from .core.client import ApiClient, run_path
from .core.errors import MissingExtra, NotFound, RunwatchError, StackMismatch, StackNotRunning
from .core.names import INTERNAL_PREFIX, SCRIPT_RUN
from .core.settings import Settings
from .core.states import TERMINAL
from .output import OUT, Col, num


# typer 0.29's help shows `<bool>` after every flag (--help included) and `<str>` after every argument, and
# writes a required argument as `{RUN_ID}` in the usage line: a flag takes no value, and the metavars say it all.
def _usage_name(self) -> str:
    name = self.display_name_raw
    if name.startswith("["):
        return name
    return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")


if hasattr(typer.core.TyperOption, "display_type_rich"):  # typer >= 0.2x; older typers print clean help
    _display_type_rich = typer.core.TyperOption.display_type_rich
    typer.core.TyperOption.display_type_rich = (
        lambda self, ctx: None if self.is_flag or self.count else _display_type_rich(self, ctx))
    typer.core.TyperArgument.display_type_rich = lambda self, ctx: None
if hasattr(typer.core.TyperArgument, "_usage_display_name"):
    typer.core.TyperArgument._usage_display_name = _usage_name

app = typer.Typer(help="runwatch: self-hosted run monitoring for machine-learning training.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
runs_app = typer.Typer(help="List and show runs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
dash_app = typer.Typer(help="Grafana dashboards and alert rules (the studio of the server deployment).",
                       no_args_is_help=True)
app.add_typer(dash_app, name="dashboards")
console = OUT.out
err = OUT.err

#: Exit codes (docs/cli.md).
OK, FAILED, USAGE, NOT_RUNNING, NOT_FOUND, INTERRUPTED = 0, 1, 2, 3, 4, 130


def _version(value: bool) -> None:
    if value:
        typer.echo(f"runwatch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print runwatch's version and exit.")) -> None:
    """runwatch: self-hosted run monitoring for machine-learning training."""


def _json_mode(value: bool) -> bool:
    OUT.json = bool(value)
    return value


HomeOpt = typer.Option(None, "--home", metavar="DIR", help="RUNWATCH_HOME (default: $RUNWATCH_HOME or ~/.runwatch).")
JsonOpt = typer.Option(False, "--json", callback=_json_mode, is_eager=True,
                       help="Print strict JSON (errors too, on stderr) instead of text.")


def _settings(home: Optional[Path]) -> Settings:
    return Settings.load(home=home)


def _client(home: Optional[Path]) -> ApiClient:
    return ApiClient(_settings(home))


def _print_json(value: Any) -> None:
    OUT.print_json(value)


def _fail(message: str, code: int = FAILED) -> None:
    if OUT.json:
        from .output import dumps

        sys.stderr.write(dumps({"error": message, "code": code}) + "\n")
    else:
        from rich.markup import escape

        err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _call(fn):
    try:
        return fn()
    except (StackNotRunning, StackMismatch) as exc:
        _fail(str(exc), NOT_RUNNING)
    except NotFound as exc:
        _fail(str(exc), NOT_FOUND)
    except RunwatchError as exc:
        _fail(str(exc))


def _time(iso: Optional[str]) -> str:
    return (iso or "")[:19].replace("T", " ")


# ------------------------------------------------------------------------------ the stack
@app.command()
def up(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Start the embedded stack (broker, worker with processors, sink and read API) and wait until it is ready."""
    from .stack import StackError
    from .stack import up as stack_up

    settings = _settings(home)
    try:
        if OUT.json or not OUT.terminal:
            result = stack_up(settings, progress=lambda s: None)
        else:
            with console.status("starting runwatch") as st:
                result = stack_up(settings, progress=lambda s: st.update(s))
    except (StackError, RunwatchError) as exc:
        _fail(str(exc), USAGE if isinstance(exc, MissingExtra) else FAILED)
    rec = result.record
    if as_json:
        return _print_json({"started": list(result.started), "seconds": result.seconds,
                            "bootstrap_servers": rec["bootstrap_servers"], "api_url": rec["api_url"],
                            "home": str(settings.home)})
    if result.started:
        OUT.line(f"runwatch is up in {result.seconds:.1f} s (started: {', '.join(result.started)})")
    else:
        OUT.line("runwatch is already running")
    OUT.pairs([("broker", f"{rec['bootstrap_servers']} (Tansu, in memory)"), ("read API", rec["api_url"]),
               ("data", settings.home)], indent=2)
    OUT.line("Stop it with `runwatch down`; see its health with `runwatch status`.")


@app.command()
def down(home: Optional[Path] = HomeOpt,
         force: bool = typer.Option(False, "--force", help="Do not wait for the worker: save what it has not stored."),
         timeout: float = typer.Option(120.0, "--timeout", metavar="SECONDS",
                                       help="How long to wait for the worker to store everything."),
         as_json: bool = JsonOpt) -> None:
    """Stop the embedded stack, once the worker has stored what the broker holds (or it is saved to disk)."""
    from .stack import StackError
    from .stack import down as stack_down

    try:
        if OUT.json or not OUT.terminal:
            result = stack_down(_settings(home), force=force, timeout=timeout, progress=lambda s: None)
        else:
            with console.status("stopping runwatch") as st:
                result = stack_down(_settings(home), force=force, timeout=timeout, progress=lambda s: st.update(s))
    except StackError as exc:
        _fail(str(exc))
    if as_json:
        return _print_json({"stopped": list(result.stopped), "seconds": result.seconds,
                            "saved_to": str(result.saved_to) if result.saved_to else None,
                            "unstored_events": result.unstored_events, "unstored_points": result.unstored_points})
    if result.saved_to:
        OUT.line(f"the worker had not stored {result.unstored_events:,} event(s) ({result.unstored_points:,} "
                 f"points): saved to {result.saved_to}; the next `runwatch up` sends them")
    OUT.line(f"stopped: {', '.join(result.stopped)} in {result.seconds:.1f} s" if result.stopped
             else "nothing was running")


@app.command()
def status(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Health of each part, consumer lag and row counts (exit code 3 when the stack is not running)."""
    from .stack import status as stack_status

    settings = _settings(home)
    info = stack_status(settings)
    if as_json:
        _print_json(info)
        raise typer.Exit(OK if info["running"] else NOT_RUNNING)
    if not info["recorded"] and not info["worker"]["health"]:
        _fail(f"the stack is not running under {settings.home}. Start it with `runwatch up`.", NOT_RUNNING)
    h = info["worker"]["health"] or {}
    rows = [("broker", _ok(info["broker"]["alive"]), f"{info['broker']['address']} pid {info['broker']['pid']}"),
            ("worker", _ok(bool(h)), f"{info['worker']['api_url']} pid {info['worker']['pid']}")]
    if h:
        p, s = h["processors"], h["sink"]
        rows.append(("processors", _ok(p["ready"]), f"events {p['events']}, dead letters {p['dead_letters']}"))
        lag = sum(s["lag"].values())
        rows.append(("sink", _ok(s["ready"] and not s["error"]),
                     f"lag {lag} messages, batches {s['batches']}" + (f", error: {s['error']}" if s["error"] else "")))
        rows.append(("ClickHouse", _ok("clickhouse_error" not in h), "rows stored (a run's versions count until "
                     "merged): " + ", ".join(f"{k} {v}" for k, v in h.get("rows", {}).items())))
    OUT.table([Col("part"), Col("state"), Col("details")], rows, title=f"runwatch at {settings.home}")
    raise typer.Exit(OK if info["running"] else NOT_RUNNING)


def _ok(flag: bool) -> str:
    return "ok" if flag else "down"


@app.command(hidden=True)
def worker() -> None:
    """Run the worker process in the foreground (what `runwatch up` starts)."""
    from .worker import run

    run(Settings.load())


@app.command()
def sync(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Send spooled events (from offline runs, or processes that ended while the broker was away)."""
    from runwatch.producers.sync import sync_spools

    settings = _settings(home)
    try:
        if OUT.json or not OUT.terminal:
            result = sync_spools(settings)
        else:
            from rich.progress import DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            with Progress(TextColumn("sending {task.description}"), DownloadColumn(), TransferSpeedColumn(),
                          console=err, transient=True) as bar:
                task = bar.add_task("spools", total=None)
                result = sync_spools(settings, progress=lambda name, done, total: bar.update(
                    task, description=name, completed=done, total=total))
    except RunwatchError as exc:
        _fail(str(exc), NOT_RUNNING)
    if as_json:
        return _print_json(result)
    OUT.line(f"sent {result['events']} events from {result['spools']} spool(s); "
             f"{result['busy']} still owned by a running process")


# ------------------------------------------------------------------------------ reading
@app.command()
def experiments(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Every experiment with its runs by status and its latest activity (newest first)."""
    rows = _call(lambda: _client(home).get("/api/experiments"))
    if as_json:
        return _print_json(rows)
    OUT.table([Col("experiment", ident=True), Col("runs", justify="right"), Col("by status"),
               Col("latest activity (UTC)", ident=True)],
              [(r["name"], r["runs"], ", ".join(f"{k} {v}" for k, v in r["by_status"].items()),
                _time(r["latest_activity"])) for r in rows])


@runs_app.command("list")
def runs_list(experiment: Optional[str] = typer.Option(None, "--experiment", "-e", metavar="NAME",
                                                       help="Only this experiment's runs."),
              status_: Optional[list[str]] = typer.Option(None, "--status", metavar="STATUS",
                                                          help="Only runs in this status; repeat for several."),
              tag: Optional[list[str]] = typer.Option(None, "--tag", metavar="NAME[=VALUE]",
                                                      help="Only runs with this tag; repeat for several."),
              metric: Optional[str] = typer.Option(None, "--metric", metavar="NAME",
                                                   help="Show (and sort by) this metric."),
              sort: str = typer.Option("min", "--sort", metavar="min|max|last",
                                       help="Which aggregate of --metric sorts the runs."),
              descending: bool = typer.Option(False, "--desc", help="Largest first."),
              include_children: bool = typer.Option(False, "--children", help="Include child runs."),
              limit: int = typer.Option(100, "--limit", metavar="N", help="At most N runs."),
              home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Runs, newest first, or sorted by a metric's min, max or last value (`--metric loss --sort min`)."""
    if sort not in ("min", "max", "last"):
        _fail(f"--sort must be min, max or last, not {sort!r}", USAGE)
    params = dict(experiment=experiment, status=status_ or None, tag=tag or None, limit=limit,
                  include_children=str(include_children).lower())
    if metric:
        params.update(sort_metric=metric, sort=sort, order="desc" if descending else "asc", metric=metric)
    rows = _call(lambda: _client(home).get("/api/runs", **params))
    if as_json:
        return _print_json(rows)
    cols = [Col("run", ident=True), Col("experiment", ident=True), Col("status"), Col("started (UTC)", ident=True),
            Col("duration s", justify="right")]
    if metric:
        cols.append(Col(f"{metric} {sort}", ident=True, justify="right"))
    out = []
    for r in rows:
        m = (r.get("metrics") or {}).get(metric) if metric else None
        out.append([r["run_id"], r["experiment"], r["status"], _time(r["start_time"]),
                    "" if r["duration_s"] is None else f"{r['duration_s']:.1f}",
                    *([num(m.get(sort)) if m else ""] if metric else [])])
    OUT.table(cols, out)


@runs_app.command("show")
def runs_show(run_id: str = typer.Argument(..., metavar="RUN_ID"), home: Optional[Path] = HomeOpt,
              all_: bool = typer.Option(False, "--all", help="Also runwatch's own properties (_runwatch.*)."),
              as_json: bool = JsonOpt) -> None:
    """One run's details: status, times, tags, properties, error, children, status history."""
    client = _client(home)
    run = _call(lambda: client.get(run_path(run_id)))
    run["children"] = sorted(_call(lambda: client.get(run_path(run_id, "children"))),
                             key=lambda c: (c.get("created_time") or "", c["run_id"]))
    run["history"] = _call(lambda: client.get(run_path(run_id, "history")))
    if as_json:
        return _print_json(run)
    OUT.pairs([("run", run["run_id"]), ("experiment", run["experiment"]), ("display name", run.get("display_name")),
               ("status", run["status"]), ("type", run.get("run_type")), ("compute", run.get("compute_target")),
               ("parent", run.get("parent_run_id")), ("created (UTC)", _time(run.get("created_time"))),
               ("started (UTC)", _time(run.get("start_time"))), ("ended (UTC)", _time(run.get("end_time"))),
               ("duration s", "" if run.get("duration_s") is None else f"{run['duration_s']:.3f}"),
               ("dropped points", run.get("dropped_points"))]
              + ([("description", run["description"])] if run.get("description") else []))
    for title, items in (("tags", run.get("tags") or {}), ("properties", run.get("properties") or {})):
        shown = {k: v for k, v in items.items() if all_ or not k.startswith(INTERNAL_PREFIX)}
        OUT.line(f"\n{title}" + ("" if shown else ": none"))
        OUT.pairs([(k, "(no value)" if v is None else v) for k, v in sorted(shown.items())], indent=2)
    if run.get("error"):
        err_ = run["error"]
        OUT.line("\nerror")
        OUT.pairs([("code", err_.get("code")), ("message", err_.get("message"))], indent=2)
    if run["children"]:
        OUT.line("\nchildren (by start)")
        OUT.table([Col("run", ident=True), Col("name", ident=True), Col("status")],
                  [(c["run_id"], c.get("display_name") or "", c["status"]) for c in run["children"]])
    OUT.line("\nhistory  " + " -> ".join(h["to"] + ("" if h["applied"] else " (rejected)") for h in run["history"]))


@app.command()
def metrics(run_id: str = typer.Argument(..., metavar="RUN_ID"),
            name: Optional[str] = typer.Option(None, "--name", "-n", metavar="NAME", help="Only this metric."),
            recursive: bool = typer.Option(False, "--recursive", help="Also every descendant run, by run id."),
            home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """A run's metrics in the get_metrics() shape (NaN and the infinities as strings under --json)."""
    data = _call(lambda: _client(home).get(run_path(run_id, "metrics"), name=name,
                                           recursive=str(recursive).lower()))
    if as_json:
        return _print_json(data)
    if not recursive:
        return _print_metrics(data)
    for i, (rid, m) in enumerate(data.items()):
        OUT.line(("\n" if i else "") + f"run {rid}")
        _print_metrics(m)


def _print_metrics(data: dict[str, Any]) -> None:
    rows = []
    for k, v in data.items():
        if isinstance(v, dict):
            value = "; ".join(f"{c}: {_short(vals)}" for c, vals in v.items())
        else:
            value = _short(v)
        rows.append((k, value))
    OUT.table([Col("metric", ident=True), Col("value")], rows)


def _short(v: Any, n: int = 8) -> str:
    if isinstance(v, list):
        shown = ", ".join(num(x) for x in v[:n])
        return f"[{shown}{', …' if len(v) > n else ''}] ({len(v)} values)"
    return num(v)


# ------------------------------------------------------------------------------ submitted runs
def _workspace(home: Optional[Path]):
    from runwatch.producers.run import Workspace

    return Workspace(settings=_settings(home))


@app.command(context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
def submit(script: str = typer.Argument(..., metavar="SCRIPT", help="The script to run, relative to --source-dir."),
           args: Optional[list[str]] = typer.Argument(None, metavar="ARGS",
                                                      help="Arguments passed to the script."),
           experiment: str = typer.Option(..., "--experiment", "-e", metavar="NAME", help="The experiment's name."),
           nodes: int = typer.Option(1, "--nodes", metavar="N", help="node_count: how many nodes to start."),
           procs: int = typer.Option(1, "--procs", metavar="M", help="process_count_per_node: processes per node."),
           compute: str = typer.Option("local", "--compute", metavar="TARGET",
                                       help="The compute target (setting compute_targets)."),
           source_dir: Path = typer.Option(Path("."), "--source-dir", metavar="DIR",
                                           help="Snapshotted and run from there."),
           env: Optional[list[str]] = typer.Option(None, "--env", metavar="NAME=VALUE",
                                                   help="An environment variable for the script; repeat."),
           no_wait: bool = typer.Option(False, "--no-wait", help="Print the run id and return at once."),
           home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Submit SCRIPT as a run: wait for it and show its output (options go before SCRIPT). With --json, the run's
    details are printed once it ends (its output is not streamed)."""
    from runwatch.producers.config import ConfigError, ScriptRunConfig
    from runwatch.producers.run import Experiment
    from runwatch.producers.snapshot import SnapshotError

    variables = {}
    for item in env or []:
        k, eq, v = item.partition("=")
        if not eq or not k:
            _fail(f"--env {item!r}: give NAME=VALUE", USAGE)
        variables[k] = v
    try:
        exp = Experiment(_workspace(home), experiment)
        config = ScriptRunConfig(source_directory=str(source_dir), script=script, arguments=list(args or []),
                                 compute_target=compute, node_count=nodes, process_count_per_node=procs,
                                 environment_variables=variables)
        if OUT.json or not OUT.terminal:
            run = exp.submit(config)
        else:
            with err.status(f"snapshotting {source_dir} and submitting"):
                run = exp.submit(config)
    except (ConfigError, SnapshotError, RunwatchError, ValueError) as exc:
        _fail(str(exc), USAGE)
    if no_wait:
        if as_json:
            return _print_json({"run_id": run.id, "status": run.get_status()})
        typer.echo(run.id)
        return
    try:
        details = run.wait_for_completion(show_output=not as_json, raise_on_error=False)
    except KeyboardInterrupt:
        err.print(f"stopped watching; the run goes on. Cancel it with `runwatch cancel {run.id}`", highlight=False,
                  soft_wrap=True)
        raise typer.Exit(INTERRUPTED)
    if as_json:
        _print_json(details)
    raise typer.Exit(OK if details["status"] == "Completed" else FAILED)


@app.command()
def cancel(run_id: str = typer.Argument(..., metavar="RUN_ID"), home: Optional[Path] = HomeOpt,
           as_json: bool = JsonOpt) -> None:
    """Cancel a run; a submitted run's launcher stops every one of its processes."""
    from runwatch.producers.run import Run

    run = _call(lambda: Run.get(_workspace(home), run_id))
    was = run.status
    if was in TERMINAL:
        _fail(f"run {run_id} is already {was}")
    run.cancel()
    if as_json:
        return _print_json({"run_id": run_id, "was": was, "status": run.get_status()})
    OUT.line(f"cancel requested for {run_id} (it was {was}); its launcher stops its processes"
             if run.run_type == SCRIPT_RUN else f"run {run_id} canceled (it was {was})")


@app.command()
def files(run_id: str = typer.Argument(..., metavar="RUN_ID"), home: Optional[Path] = HomeOpt,
          as_json: bool = JsonOpt) -> None:
    """Every file of a run: its log files (azureml-logs/, logs/) and stored files."""
    rows = _call(lambda: _client(home).get(run_path(run_id, "files")))
    if as_json:
        return _print_json(rows)
    OUT.table([Col("file", ident=True), Col("kind"), Col("lines", justify="right"), Col("bytes", justify="right"),
               Col("last written (UTC)", ident=True)],
              [(f["name"], f["kind"], f.get("lines", ""), f.get("bytes", f.get("size", "")), _time(f.get("last_ts")))
               for f in rows])


@app.command()
def download(run_id: str = typer.Argument(..., metavar="RUN_ID"),
             name: str = typer.Argument(..., metavar="NAME", help="A file of the run (see `runwatch files`)."),
             output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="PATH",
                                                   help="File or directory (default: here)."),
             home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Download one file of a run (a stored file, an output or a log file)."""
    from runwatch.producers.files import download as fetch

    if OUT.json or not OUT.terminal:
        target, n = _call(lambda: fetch(_client(home), run_id, name, output))
    else:
        from rich.progress import DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        with Progress(TextColumn("downloading {task.description}"), DownloadColumn(), TransferSpeedColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task(name, total=None)
            target, n = _call(lambda: fetch(_client(home), run_id, name, output,
                                            progress=lambda done: bar.update(task, completed=done)))
    if as_json:
        return _print_json({"run_id": run_id, "name": name, "path": str(target), "bytes": n})
    OUT.line(f"{name} -> {target} ({n:,} bytes)")


@app.command()
def logs(run_id: str = typer.Argument(..., metavar="RUN_ID"),
         file: Optional[list[str]] = typer.Option(None, "--file", "-f", metavar="FILE",
                                                  help="A log file (see `runwatch files`); repeat."),
         follow: bool = typer.Option(False, "--follow", help="Keep printing new lines until the run ends."),
         tail: Optional[int] = typer.Option(None, "--tail", metavar="N",
                                            help="Start with the last N lines of each log file."),
         home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Print a run's log files (default: the driver logs of every process); --follow keeps going. With --json, one
    JSON object a line: {"file", "seq", "ts", "line"}."""
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
            _fail(f"run {run_id} has no log file {f!r}; it has: {', '.join(sorted(names)) or 'none yet'}", NOT_FOUND)
    out = typer.get_text_stream("stdout")
    follower = OutputFollower(client, run_id, out, chosen, as_json=as_json)
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
        raise typer.Exit(INTERRUPTED)


@app.command()
def clusters(name: Optional[str] = typer.Argument(None, metavar="NAME", help="One compute target."),
             home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Compute targets with their slots and their queued and running runs."""
    client = _client(home)
    rows = _call(lambda: [client.get(f"/api/compute/{name}")] if name else client.get("/api/compute"))
    if as_json:
        return _print_json(rows)
    for i, c in enumerate(rows):
        OUT.line(("\n" if i else "") + f"{c['name']}: {c['slots_in_use']} of {c['slots'] or '?'} process slots in use, "
                 f"{len(c['running'])} running, {len(c['queued'])} queued")
        if c["running"] or c["queued"]:
            OUT.table([Col("run", ident=True), Col("experiment", ident=True), Col("status"),
                       Col("processes", justify="right"), Col("since (UTC)", ident=True)],
                      [(r["run_id"], r["experiment"], r["status"], r["processes"],
                        _time(r["start_time"] or r["created_time"])) for r in c["running"] + c["queued"]])


# ------------------------------------------------------------------------------ Grafana
ApiUrlOpt = typer.Option(None, "--api-url", metavar="URL", help="Where Grafana's browsers reach the read API (run images).")


@dash_app.command("export")
def dashboards_export(directory: Path = typer.Argument(..., metavar="DIR",
                                                       help="Written: generated/*.json and provisioning/."),
                      api_url: Optional[str] = ApiUrlOpt, as_json: bool = JsonOpt) -> None:
    """Write the dashboards' JSON and Grafana's provisioning files (datasource, dashboards, alert rules)."""
    from runwatch.dashboards.export import write

    total, written = write(directory, api_url)
    if as_json:
        return _print_json({"directory": str(directory), "files": total, "written": [str(w) for w in written]})
    OUT.line(f"{total} files under {directory}: {len(written)} written, {total - len(written)} already current")


@dash_app.command("push")
def dashboards_push(grafana: str = typer.Option(..., "--grafana", metavar="URL",
                                                help="Grafana's URL, e.g. http://localhost:3000"),
                    token: Optional[str] = typer.Option(None, "--token", envvar="GRAFANA_TOKEN", metavar="TOKEN",
                                                        help="A service account token (or $GRAFANA_TOKEN)."),
                    api_url: Optional[str] = ApiUrlOpt,
                    webhook_url: Optional[str] = typer.Option(None, "--webhook-url", metavar="URL",
                                                              help="Also create or update the alert webhook."),
                    as_json: bool = JsonOpt) -> None:
    """Create or update the dashboards and alert rules in a running Grafana (safe to repeat)."""
    from runwatch.dashboards.push import push

    try:
        if OUT.json or not OUT.terminal:
            result = push(grafana, token, api_url, webhook_url)
        else:
            with err.status(f"pushing the dashboards and alert rules to {grafana}"):
                result = push(grafana, token, api_url, webhook_url)
    except MissingExtra as exc:
        _fail(str(exc), USAGE)
    except Exception as exc:  # grafana-client raises several unrelated types
        _fail(f"pushing to {grafana} failed: {_reason(exc)}")
    if as_json:
        return _print_json({"grafana": grafana, **result})
    OUT.line(f"pushed {result['dashboards']} dashboards and {result['alert_rules']} alert rules to {grafana}")


def _reason(exc: BaseException) -> str:
    """A connection error's cause in a sentence, not urllib3's repr of its pool."""
    seen = exc
    while seen is not None:
        name = type(seen).__name__
        if "NewConnectionError" in name or isinstance(seen, ConnectionRefusedError):
            return "cannot connect (is Grafana running there, and is the URL right?)"
        if "NameResolution" in name or "gaierror" in name:
            return "cannot resolve the host name"
        if "Timeout" in name:
            return "it did not answer in time"
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {exc}"


@app.command()
def demo(home: Optional[Path] = HomeOpt,
         steps: int = typer.Option(300, "--steps", metavar="N", help="Training steps of the sample run."),
         keep: bool = typer.Option(True, "--keep/--no-keep", help="Leave the stack running afterwards.")) -> None:
    """Bring the stack up and run a sample training that logs every metric kind, shown live."""
    from .demo import run_demo

    code = run_demo(_settings(home), steps=steps, console=console, keep=keep)
    raise typer.Exit(code)


def main() -> None:
    try:
        app(prog_name="runwatch")
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)


if __name__ == "__main__":
    main()

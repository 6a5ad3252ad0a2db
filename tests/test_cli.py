"""The CLI as people use it: piped into other tools, at 80 columns, with --json read by a strict parser, and in
a real terminal (tmux) for the demo. Identifiers (run ids, file names, commands to copy) must appear whole on
one line; --json must be RFC 8259 JSON, errors included. Against the real embedded stack."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, unique_name, wait_until

from runwatch import Experiment, Workspace


def strict_json(text: str):
    """Python's json.loads, refusing NaN and the infinities as JSON does (RFC 8259)."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def rw(env: dict, *args: str, columns: int = 80, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI with stdout a pipe, as `runwatch ... | grep` or `| cut` runs it, at `columns`."""
    return subprocess.run([sys.executable, "-m", "runwatch.cli", *args], capture_output=True, text=True,
                          env=dict(env, COLUMNS=str(columns)), cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def logged(worker):
    """Runs with long ids, long file names, non-finite metrics, tags, internal properties and children."""
    from _pytest.monkeypatch import MonkeyPatch

    from conftest import point_sdk_at

    mp = MonkeyPatch()
    home = worker.home.parent / "cli-sdk"
    point_sdk_at(mp, worker, home, flush_interval="0.05")
    try:
        exp = Experiment(Workspace.from_config(), unique_name("a-rather-long-experiment-name-for-the-cli"))
        parent = exp.start_logging(display_name="the parent run with a long display name, to be wrapped")
        parent.log("loss", 0.30000000000000004)
        parent.log("loss", 0.1)
        parent.log("weird", math.nan)
        parent.log("weird", math.inf)
        parent.log("weird", -math.inf)
        parent.log_row("roc", fpr=0.1, tpr=0.7)
        parent.tag("demo")
        parent.tag("optimizer", "adam")
        parent.add_properties({"author": "me"})
        src = home / "a-file-with-a-long-name-that-must-never-be-folded-across-two-lines.txt"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text("hello\n")
        parent.upload_file("outputs/" + src.name, str(src))
        kids = []
        for i in range(3):
            with parent.child_run(name=f"child-{i}") as kid:
                kid.log("loss", 1.0 / (i + 1))
            kids.append(kid)
            time.sleep(0.01)  # distinct start times: children are listed by start
        parent.complete()
        parent.flush(10)
        env = {k: v for k, v in os.environ.items()}
        wait_until(lambda: json.loads(rw(env, "runs", "show", parent.id, "--json").stdout or "{}").get(
            "status") == "Completed" and len(json.loads(rw(env, "runs", "show", parent.id, "--json").stdout)[
                "children"]) == 3, 30, what="the runs stored")
        yield env, exp, parent, kids, "outputs/" + src.name
    finally:
        from runwatch.producers.emitter import close_all

        close_all(5)
        mp.undo()


def test_every_command_piped_at_80_columns_keeps_identifiers_whole(logged):
    env, exp, parent, kids, file_name = logged
    ids = [parent.id] + [k.id for k in kids]
    commands = {
        ("runs", "list", "-e", exp.name, "--children"): ids,
        ("runs", "list", "-e", exp.name, "--children", "--metric", "loss", "--sort", "min"): ids,
        ("runs", "show", parent.id): ids + ["optimizer", "adam", "author"],
        ("experiments",): [exp.name],
        ("files", parent.id): [file_name],
        ("metrics", parent.id): ["loss", "weird"],
        ("metrics", parent.id, "--recursive"): ids,
        ("clusters",): ["local"],
    }
    for args, must in commands.items():
        out = rw(env, *args)
        assert out.returncode == 0, (args, out.stderr)
        lines = out.stdout.splitlines()
        for ident in must:
            assert any(ident in ln for ln in lines), f"{args}: {ident!r} is not whole on any line:\n{out.stdout}"
        assert "\x1b[" not in out.stdout, f"{args}: styling codes in piped output"
    # piped, tables are tab-separated with a header: what `cut -f` and `awk -F'\t'` need
    listed = rw(env, "runs", "list", "-e", exp.name, "--children", "--metric", "loss", "--sort", "min").stdout
    header, *rows = [ln.split("\t") for ln in listed.splitlines()]
    assert header[:3] == ["run", "experiment", "status"] and header[-1] == "loss min"
    assert {r[0] for r in rows} == set(ids) and all(len(r) == len(header) for r in rows)
    by_id = {r[0]: r for r in rows}
    assert by_id[parent.id][-1] == "0.1" and by_id[kids[2].id][-1] == repr(1.0 / 3)  # the value sorted by, whole
    shown = rw(env, "runs", "show", parent.id).stdout
    assert "_runwatch." not in shown and "_runwatch.user" in rw(env, "runs", "show", parent.id, "--all").stdout
    import re

    assert re.search(r"^  demo +\(no value\)$", shown, re.M) and "'demo': None" not in shown
    assert re.search(r"^  optimizer +adam$", shown, re.M)
    order = [shown.index(k.id) for k in kids]
    assert order == sorted(order), "children in the order they started"
    metrics = rw(env, "metrics", parent.id).stdout
    assert "NaN, Infinity, -Infinity" in metrics and "0.30000000000000004, 0.1" in metrics
    recursive = rw(env, "metrics", parent.id, "--recursive").stdout
    assert f"run {parent.id}" in recursive and "metric\tvalue" in recursive


def test_every_command_on_a_narrow_terminal_keeps_identifiers_whole(logged):
    """A terminal 80 columns wide (Rich's own rendering, forced): identifier columns never fold; a table that
    cannot fit them prints one block per row."""
    env, exp, parent, kids, file_name = logged
    tty = dict(env, FORCE_COLOR="1", TTY_COMPATIBLE="1", TTY_INTERACTIVE="0")
    for args, must in {("runs", "list", "-e", exp.name, "--children", "--metric", "loss"): [parent.id],
                       ("files", parent.id): [file_name], ("runs", "show", parent.id): [parent.id]}.items():
        out = rw(tty, *args)
        assert out.returncode == 0, out.stderr
        plain = _strip_ansi(out.stdout)
        for ident in must:
            assert any(ident in ln for ln in plain.splitlines()), f"{args}: {ident!r} folded:\n{plain}"


def _strip_ansi(s: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", s)


def test_json_is_strict_everywhere_errors_included(logged, tmp_path):
    env, exp, parent, kids, file_name = logged
    status = rw(env, "status", "--json")  # exit code 3: this worker was not started by `runwatch up`
    assert status.returncode in (0, 3) and "running" in strict_json(status.stdout)
    for args in (("experiments",), ("runs", "list", "-e", exp.name), ("runs", "show", parent.id),
                 ("metrics", parent.id), ("metrics", parent.id, "--recursive"), ("files", parent.id),
                 ("clusters",), ("sync",), ("download", parent.id, file_name, "-o", str(tmp_path)),
                 ("dashboards", "export", str(tmp_path / "dash"))):
        out = rw(env, *args, "--json")
        assert out.returncode == 0, (args, out.stderr)
        strict_json(out.stdout)
    weird = strict_json(rw(env, "metrics", parent.id, "--json").stdout)["weird"]
    assert weird == ["NaN", "Infinity", "-Infinity"]
    logs = rw(env, "logs", parent.id, "--json")
    assert logs.returncode == 0 and all(strict_json(ln) for ln in logs.stdout.splitlines())
    # errors: {"error", "code"} on stderr, the same exit code as without --json
    for args, code in ((("runs", "show", "no-such-run"), 4), (("metrics", "no-such-run"), 4),
                       (("runs", "list", "--sort", "median"), 2), (("cancel", parent.id), 1)):
        out = rw(env, *args, "--json")
        assert out.returncode == code, (args, out.returncode, out.stderr)
        assert out.stdout == ""
        e = strict_json(out.stderr)
        assert e["code"] == code and e["error"], e
        plain = rw(env, *args)
        assert plain.returncode == code and plain.stderr.startswith("error:")


def test_version_completion_and_help_without_metavar_noise(tmp_path):
    env = dict(os.environ, RUNWATCH_HOME=str(tmp_path))
    from runwatch import __version__

    assert rw(env, "--version").stdout.strip() == f"runwatch {__version__}"
    top = rw(env, "--help").stdout
    assert "--install-completion" in top and "--show-completion" in top
    for args in (("--help",), ("runs", "list", "--help"), ("metrics", "--help"), ("submit", "--help"),
                 ("logs", "--help"), ("down", "--help")):
        text = rw(env, *args).stdout
        assert "<bool>" not in text and "<str>" not in text and "{" not in text.split("\n\n")[1], (args, text)
    assert "Usage: runwatch metrics [OPTIONS] RUN_ID" in rw(env, "metrics", "--help").stdout
    assert "Only this metric." in rw(env, "metrics", "--help").stdout
    assert "last N lines of each log file" in rw(env, "logs", "--help").stdout


def test_pushing_to_a_grafana_that_is_not_there_says_so(tmp_path):
    env = dict(os.environ, RUNWATCH_HOME=str(tmp_path))
    out = rw(env, "dashboards", "push", "--grafana", "http://127.0.0.1:9", "--token", "x")
    assert out.returncode == 1
    assert "cannot connect (is Grafana running there" in out.stderr and "NewConnectionError" not in out.stderr
    j = rw(env, "dashboards", "push", "--grafana", "http://127.0.0.1:9", "--token", "x", "--json")
    assert strict_json(j.stderr)["code"] == 1


def test_the_demo_in_a_real_80_column_terminal(tmp_path):
    """`runwatch demo` in tmux, 80 columns: the live table fits, the commands to copy are whole lines."""
    assert shutil.which("tmux"), "tmux is missing: `./dev test` installs it (Debian)"
    session = f"rw{os.getpid()}"
    home = tmp_path / "demo"
    env_cmd = " ".join(f"{k}={v}" for k, v in {"RUNWATCH_HOME": str(home)}.items())
    cmd = f"env -u COLUMNS {env_cmd} {sys.executable} -m runwatch.cli demo --steps 20 --no-keep; echo EXIT=$?; sleep 60"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RUNWATCH_", "TMUX"))}
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "60", cmd], check=True, env=clean,
                   cwd=ROOT)
    try:
        def screen(join: bool) -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", *(["-J"] if join else []), "-S", "-", "-t", session],
                                  capture_output=True, text=True).stdout

        wait_until(lambda: "EXIT=" in screen(True), 240, 0.5, what="the demo to end")
        joined, raw = screen(True), screen(False)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert "EXIT=0" in joined, joined
    run_id = next(w for ln in joined.splitlines() if ln.startswith("submitted run ")
                  for w in [ln.split()[2].rstrip(":")])
    assert all(len(ln) <= 80 for ln in raw.splitlines()), "the terminal is 80 columns"
    lines = joined.splitlines()
    for cmd in (f"runwatch files {run_id}", f"runwatch runs show {run_id}",
                "runwatch runs list --experiment sample --children --metric loss --sort min"):
        assert any(ln.strip().startswith(cmd) for ln in lines), f"{cmd!r} is not one line:\n{joined}"
    assert "20/20" in joined and "Completed" in joined
    table = [ln for ln in raw.splitlines() if ln.startswith(("┃", "│", "┏", "┡", "└"))]
    assert table and all(len(ln) <= 80 for ln in table)

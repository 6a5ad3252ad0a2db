"""The embedded stack's ordinary lifecycle, as a user lives it: `runwatch down`/`up` in the middle of a run,
a broker or worker that dies, a worker that falls behind, two stacks at once, spools left behind.

Real processes only: `runwatch up|down` through the CLI under a temporary RUNWATCH_HOME (the Tansu broker,
the worker with its chDB), and training processes that find the stack through that home, as a user's
script does. Each test sends numbered points and compares them with what the read API gives back:
missing = sent - distinct stored, duplicates = stored - distinct stored. Figures go to
test-output/restarts.{json,md} (docs/reliability.md, "Restarts").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, unique_name, wait_until
from figures import Figures
from runwatch.core.client import ApiClient
from runwatch.core.errors import NotFound, RunwatchError
from runwatch.core.net import pid_alive
from runwatch.core.settings import Settings

pytestmark = pytest.mark.stack
FIGURES = Figures("restarts", "tests/test_restarts.py")

#: A training script that logs numbered points (value = step) in phases: between phases it waits for the
#: test to create `<progress>.go<k>`, so the test can restart the stack while the run is under way.
TRAINER = r"""
import json, os, sys, time
from runwatch import Workspace, Experiment
phases, progress = [int(x) for x in sys.argv[1].split(",")], sys.argv[2]
name = os.environ.get("TRAINER_METRIC", "x")
run = Experiment(Workspace.from_config(), os.environ["TRAINER_EXPERIMENT"]).start_logging()
def note(**kw):
    with open(progress + ".tmp", "w") as f:
        json.dump(dict(kw, run_id=run.id), f)
    os.replace(progress + ".tmp", progress)
i = 0
for k, n in enumerate(phases):
    if k:
        while not os.path.exists(f"{progress}.go{k}"):
            time.sleep(0.05)
    for _ in range(n):
        run.log(name, float(i))
        i += 1
    run.flush(30)
    note(phase=k, logged=i)
run.complete()
note(phase=len(phases), logged=i, done=True, stats=repr(run.emitter.stats))
"""


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    FIGURES.write()


def rw(home: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
    env["RUNWATCH_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "runwatch.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def up(home: Path) -> dict:
    out = rw(home, "up")
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads((home / "stack.json").read_text())


def down(home: Path, *args: str) -> subprocess.CompletedProcess:
    out = rw(home, "down", *args)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


class Trainer:
    def __init__(self, home: Path, tmp: Path, phases: list[int], experiment: str, **env: str):
        self.progress = tmp / f"progress-{time.monotonic_ns()}.json"
        self.sent = sum(phases)
        e = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
        e.update(RUNWATCH_HOME=str(home), TRAINER_EXPERIMENT=experiment, RUNWATCH_FLUSH_INTERVAL="0.05", **env)
        self.proc = subprocess.Popen([sys.executable, "-c", TRAINER, ",".join(map(str, phases)), str(self.progress)],
                                     env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def state(self) -> dict:
        try:
            return json.loads(self.progress.read_text())
        except (OSError, ValueError):
            return {}

    def at_phase(self, k: int, timeout: float = 60) -> dict:
        return wait_until(lambda: self.state() if self.state().get("phase", -1) >= k else None, timeout,
                          what=f"trainer through phase {k}")

    def go(self, k: int) -> None:
        Path(f"{self.progress}.go{k}").write_text("")

    def wait(self, timeout: float = 120) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        text = out.decode(errors="replace")
        assert self.proc.returncode == 0, text[-3000:]
        return text

    @property
    def run_id(self) -> str:
        return wait_until(lambda: self.state().get("run_id"), 30, what="trainer started")


def api(home: Path) -> ApiClient:
    return ApiClient(Settings.load(home=home))


def account(home: Path, run_id: str, sent: int, name: str = "x", timeout: float = 90, since: float | None = None,
            status: str = "Completed") -> dict:
    """Wait until every sent point is stored and the run has `status` (or `timeout`); then the figures."""
    client = api(home)
    t0 = since or time.monotonic()
    values: list = []
    run: dict = {}
    while time.monotonic() - t0 < timeout:
        try:
            run = client.get(f"/api/runs/{run_id}")
            values = client.get(f"/api/runs/{run_id}/metrics", name=name, stored="true").get(name, [])
            values = values if isinstance(values, list) else [values]
        except (NotFound, RunwatchError):
            pass
        if len(set(values)) >= sent and run.get("status") == status:
            break
        time.sleep(0.25)
    distinct = set(values)
    assert distinct <= {float(i) for i in range(sent)}, "stored values that were never sent"
    return {"sent": sent, "stored": len(values), "missing": sent - len(distinct),
            "duplicates": len(values) - len(distinct), "recovery_s": round(time.monotonic() - t0, 2),
            "status": run.get("status")}


def aggregate(home: Path, run_id: str, name: str = "x") -> dict:
    return api(home).get(f"/api/runs/{run_id}/aggregates").get(name, {})


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    yield h
    if (h / "stack.json").exists():
        rw(h, "down", "--timeout", "5")


def test_down_and_up_between_runs_and_while_a_run_is_logging(home, tmp_path):
    up(home)
    # between two runs, nothing in flight
    first = Trainer(home, tmp_path, [5_000], unique_name("first"))
    first.wait()
    f1 = account(home, first.run_id, 5_000)
    down(home)
    up(home)
    second = Trainer(home, tmp_path, [5_000], unique_name("second"))
    second.wait()
    f2 = account(home, second.run_id, 5_000)
    FIGURES.record("`down`/`up` between two runs, nothing in flight", sent=10_000, stored=f1["stored"] + f2["stored"],
                   missing=f1["missing"] + f2["missing"], duplicates=f1["duplicates"] + f2["duplicates"],
                   recovery_s=f2["recovery_s"], note="the second run is logged after the restart: its offsets start at "
                                                     "0 again, under the new broker's identity")
    assert (f1["missing"], f2["missing"], f1["duplicates"], f2["duplicates"]) == (0, 0, 0, 0)
    # while a run is logging
    t = Trainer(home, tmp_path, [20_000, 20_000], unique_name("restart"))
    t.at_phase(0)
    out = down(home)
    assert "stopped: worker, broker" in out.stdout
    up(home)
    t0 = time.monotonic()
    t.go(1)
    t.wait()
    fig = account(home, t.run_id, 40_000, since=t0)
    agg = wait_until(lambda: (a := aggregate(home, t.run_id)).get("count") == 40_000 and a, 60, what="aggregates")
    t2 = Trainer(home, tmp_path, [5_000], unique_name("after"))  # a new run afterwards is stored too
    t2.wait()
    fig2 = account(home, t2.run_id, 5_000)
    FIGURES.record("`runwatch down` then `up` while a run logs; 20,000 more points; complete()", **fig,
                   note=f"status {fig['status']}; aggregates count {agg['count']:,}; a run logged afterwards: "
                        f"{fig2['stored']:,} of 5,000 stored")
    assert fig["missing"] == 0 and fig["duplicates"] == 0 and fig["status"] == "Completed"
    assert (agg["count"], agg["min"], agg["max"], agg["last"]) == (40_000, 0.0, 39_999.0, 39_999.0)
    assert fig2["missing"] == 0 and fig2["duplicates"] == 0


def test_broker_killed_mid_run_then_up(home, tmp_path):
    rec = up(home)
    t = Trainer(home, tmp_path, [20_000, 20_000], unique_name("killed"))
    t.at_phase(0)
    os.kill(rec["broker_pid"], signal.SIGKILL)  # its memory, and every event it held, are gone
    wait_until(lambda: not pid_alive(rec["broker_pid"]), 10, what="broker gone")
    t0 = time.monotonic()
    up(home)  # a new broker (a new identity) and a new worker, whose processors reload their state from the store
    t.go(1)
    t.wait()
    fig = account(home, t.run_id, 40_000, since=t0)
    agg = wait_until(lambda: (a := aggregate(home, t.run_id)).get("count") == 40_000 and a, 60, what="aggregates")
    details = api(home).get(f"/api/runs/{t.run_id}", gaps="true")
    # the record shows Completed from the runs topic at once (the run tail); the history is what is stored
    history = wait_until(lambda: (h := [h["to"] for h in api(home).get(f"/api/runs/{t.run_id}/history")
                                        if h["applied"]]) == ["Running", "Completed"] and h, 30,
                         what="the history stored")
    FIGURES.record("broker SIGKILLed mid-run, then `runwatch up`", **fig,
                   note=f"status {fig['status']} ({' -> '.join(history)}); aggregates count {agg['count']:,}; "
                        "the trainer sent again what the dead broker had not passed on")
    assert fig["missing"] == 0 and fig["duplicates"] == 0 and fig["status"] == "Completed"
    assert history == ["Running", "Completed"] and details["illegal_transitions"] == 0
    assert agg["count"] == 40_000 and agg["max"] == 39_999.0
    assert sum(details["missing_events"].values()) == 0


def test_worker_stopped_then_down_and_up_keeps_what_the_broker_held(home, tmp_path):
    rec = up(home)
    t = Trainer(home, tmp_path, [10_000, 50_000], unique_name("lagging"))
    t.at_phase(0)
    account(home, t.run_id, 10_000, status="Running")
    os.kill(rec["worker_pid"], signal.SIGSTOP)  # the sink falls behind: what comes now stays in the broker
    try:
        t.go(1)
        t.wait()
        t0 = time.monotonic()
        out = down(home, "--timeout", "3")
        down_s = round(time.monotonic() - t0, 2)
    finally:
        if pid_alive(rec["worker_pid"]):
            os.kill(rec["worker_pid"], signal.SIGCONT)
    assert "saved to" in out.stdout and "the next `runwatch up` sends them" in out.stdout, out.stdout
    t1 = time.monotonic()
    up(home)
    fig = account(home, t.run_id, 60_000, since=t1)
    FIGURES.record("worker SIGSTOPped (the sink behind), 50,000 logged, `down`, `up`", **fig,
                   note=f"`down` took {down_s} s and saved what the worker had not stored "
                        f"({out.stdout.split(' event(s)')[0].rsplit(' ', 1)[-1]} events); `up` sent it, and the "
                        "trainer's own copy of what it sent")
    assert fig["missing"] == 0 and fig["duplicates"] == 0 and fig["status"] == "Completed"
    assert not list((home / "spool").glob("down-*")), "the saved spool was sent and removed"


def test_two_ups_for_two_homes_at_once(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
    procs = [subprocess.Popen([sys.executable, "-m", "runwatch.cli", "up"], env=dict(env, RUNWATCH_HOME=str(h)),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for h in (a, b)]
    try:
        outs = [p.communicate(timeout=180)[0].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        ra, rb = (json.loads((h / "stack.json").read_text()) for h in (a, b))
        assert ra["broker_port"] != rb["broker_port"] and ra["api_url"] != rb["api_url"]
        assert ra["stack_id"] != rb["stack_id"]
        ta = Trainer(a, tmp_path, [3_000], unique_name("home-a"))
        tb = Trainer(b, tmp_path, [2_000], unique_name("home-b"))
        ta.wait()
        tb.wait()
        fa, fb = account(a, ta.run_id, 3_000), account(b, tb.run_id, 2_000)
        # each home's run is in its own store, and only there
        with pytest.raises(NotFound):
            api(a).get(f"/api/runs/{tb.run_id}")
        with pytest.raises(NotFound):
            api(b).get(f"/api/runs/{ta.run_id}")
        FIGURES.record("two `runwatch up` for two homes in the same second", sent=5_000,
                       stored=fa["stored"] + fb["stored"], missing=fa["missing"] + fb["missing"],
                       duplicates=fa["duplicates"] + fb["duplicates"],
                       note=f"ports {ra['broker_port']}/{rb['broker_port']} (brokers), "
                            f"{ra['api_url'].rsplit(':', 1)[1]}/{rb['api_url'].rsplit(':', 1)[1]} (APIs); each run in "
                            "its own home's store")
        assert (fa["missing"], fb["missing"], fa["duplicates"], fb["duplicates"]) == (0, 0, 0, 0)
    finally:
        rw(a, "down", "--force")
        rw(b, "down", "--force")


def test_a_crashed_stack_never_reads_the_stack_that_took_its_ports(tmp_path):
    a, c = tmp_path / "a", tmp_path / "c"
    from runwatch.core.net import free_port

    a.mkdir()  # ports of its own: the preferred defaults may be another stack's (tests run two at a time)
    (a / "config.toml").write_text(f"api_port = {free_port()}\nbroker_port = {free_port()}\n")
    ra = up(a)
    try:
        for pid in (ra["worker_pid"], ra["broker_pid"]):  # stack A crashes: its record stays behind
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(ra["worker_pid"]) and not pid_alive(ra["broker_pid"]), 10, what="A gone")
        # C takes the ports A had (the preferred ones when they were free; here asked for by C's config file)
        c.mkdir()
        (c / "config.toml").write_text(f"api_port = {ra['api_url'].rsplit(':', 1)[1]}\nbroker_port = {ra['broker_port']}\n")
        rc = up(c)
        assert rc["api_url"] == ra["api_url"] and rc["broker_port"] == ra["broker_port"]
        tc = Trainer(c, tmp_path, [1_000], unique_name("home-c"))
        tc.wait()
        account(c, tc.run_id, 1_000)
        st = rw(a, "status", "--json")
        status = json.loads(st.stdout)
        assert st.returncode == 3 and not status["running"] and status["worker"]["identity_mismatch"]
        assert not status["broker"]["alive"]
        listed = rw(a, "runs", "list")
        assert listed.returncode == 3 and "belongs to another runwatch stack" in listed.stderr, listed.stderr
        assert tc.run_id not in listed.stdout
        # a training script of home A does not send to C's broker: its events wait in its spool
        ta = Trainer(a, tmp_path, [500], unique_name("home-a"))
        ta.wait()
        with pytest.raises(NotFound):
            api(c).get(f"/api/runs/{ta.run_id}")
        FIGURES.record("stack A crashes, stack C starts on A's old ports", note="A's `status` says its API answers "
                       "for another stack; A's `runs list` refuses C's runs; A's training waits in its spool")
    finally:
        rw(c, "down", "--force")
        rw(a, "down", "--force")


def test_spools_left_behind_are_sent_without_asking(home, tmp_path):
    up(home)
    down(home)  # the stack is away: the training's events go to its spool, and it ends
    t = Trainer(home, tmp_path, [8_000], unique_name("offline"), RUNWATCH_REQUEST_TIMEOUT_MS="1000")
    t.wait()
    assert list((home / "spool").iterdir()), "the events waited in a spool"
    t0 = time.monotonic()
    up(home)  # no `runwatch sync`: the worker sends spools whose processes are gone
    fig = account(home, t.run_id, 8_000, since=t0)
    FIGURES.record("training while the stack is down; the process ends; `up`", **fig,
                   note="the worker sent the spool it found, without `runwatch sync`")
    assert fig["missing"] == 0 and fig["duplicates"] == 0 and fig["status"] == "Completed"
    wait_until(lambda: not any(p.glob("*.seg") for p in (home / "spool").iterdir()), 30, what="spool removed")

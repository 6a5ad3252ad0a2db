"""Submitted runs through the real stack: the launcher, log files, live output, cancel, lost runs, alerts, queue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest

from conftest import ROOT, Worker, _unique, unique_name, wait_until
from runwatch import Experiment, Run, RunFailedError, ScriptRunConfig, Workspace


class Hook:
    """A real local HTTP server standing in for an alert webhook; it keeps every JSON body it receives."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.headers.get("X-Runwatch-Alert-Id"), json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def for_run(self, run_id: str) -> list[dict]:
        return [body for _, body in self.received if body["run_id"] == run_id]


@pytest.fixture(scope="module")
def hook():
    h = Hook()
    yield h
    h.server.shutdown()


@pytest.fixture(scope="module")
def worker(broker, tmp_path_factory, hook):
    """This module's worker: quick lost-run detection, a webhook, and two compute targets."""
    env = {"RUNWATCH_HEARTBEAT_TIMEOUT": "2", "RUNWATCH_NOT_RESPONDING_TIMEOUT": "2",
           "RUNWATCH_HEARTBEAT_INTERVAL": "0.5", "RUNWATCH_ALERT_WEBHOOK_URL": hook.url,
           "RUNWATCH_COMPUTE_TARGETS": "local=4,single=1", "RUNWATCH_KILL_GRACE": "3"}
    w = Worker(broker, tmp_path_factory.mktemp("worker-home"), _unique("s"), env).start()
    yield w
    w.stop()


TRAIN = """
import os, sys, time
from runwatch import Run

run = Run.get_context()
rank = int(os.environ["RANK"])
print("env", *(f"{k}={os.environ[k]}" for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR")))
print("early")                      # no flush: the launcher makes the script's output unbuffered
time.sleep(1.2)
print("late")
for i in range(5):
    run.log("loss", 1.0 / (i + 1))
    print(f"step {i}")
    print(f"err {i}", file=sys.stderr)
print("progress 10%\\rprogress 50%\\rprogress 100%")
"""

SLEEPER = """
import os, sys, time
from runwatch import Run

run = Run.get_context()
rank = int(os.environ["RANK"])
print(f"rank {rank} pid {os.getpid()}")
if rank == 1 and "fail" in sys.argv:
    time.sleep(0.5)
    print("boom: the loss is NaN", file=sys.stderr)
    sys.exit(3)
seconds = float(os.environ.get("SLEEP", "600"))
t = time.time()
while time.time() - t < seconds:
    run.log("tick", time.time() - t)
    time.sleep(0.1)
"""


def source(tmp_path, name: str, code: str, extra: dict[str, str] | None = None):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / name).write_text(textwrap.dedent(code))
    for k, v in (extra or {}).items():
        p = src / k
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(v)
    return src


def status_is(run, *statuses):
    return lambda: run.get_status() in statuses


def pids_of(worker, run_id, n):
    """The ranks' pids from the run's process_info.json, once it is stored."""
    def check():
        info = json.loads(httpx_text(worker, f"/api/runs/{run_id}/files/azureml-logs/process_info.json"))
        return [p["pid"] for p in info["processes"]] if len(info["processes"]) == n else None
    return wait_until(check, 30, 0.1, what="process_info.json")


def httpx_text(worker, path):
    import httpx

    r = httpx.get(worker.api_url + path, timeout=10)
    r.raise_for_status()
    return r.text


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_two_processes_lifecycle_output_and_log_files(stack_env, tmp_path, capsys):
    worker = stack_env
    src = source(tmp_path, "train.py", TRAIN, {".amlignore": "data/\n*.ckpt\n", "data/big.bin": "x" * 1000,
                                               "model.ckpt": "weights", "util/helpers.py": "X = 1\n"})
    exp = Experiment(Workspace.from_config(), unique_name("submit"))
    run = exp.submit(ScriptRunConfig(source_directory=str(src), script="train.py", process_count_per_node=2))
    assert run.status == "Queued"
    details = run.wait_for_completion(show_output=True, timeout=90)
    out = capsys.readouterr().out
    assert details["status"] == "Completed"

    # the lifecycle, in Azure's order, every step applied
    history = worker.get(f"/api/runs/{run.id}/history")
    assert [h["to"] for h in history] == ["Queued", "Preparing", "Starting", "Running", "Finalizing", "Completed"]
    assert all(h["applied"] for h in history)

    # live output: each rank's lines, prefixed, in order per rank, ending with the summary
    for rank in (0, 1):
        mine = [ln.split("] ", 1)[1] for ln in out.splitlines() if ln.startswith(f"[rank {rank}] ")]
        assert mine[0] == f"env RANK={rank} LOCAL_RANK={rank} WORLD_SIZE=2 NODE_RANK=0 MASTER_ADDR=127.0.0.1"
        stdout_lines = [ln for ln in mine if not ln.startswith("err ")]
        assert stdout_lines[1:] == ["early", "late", *(f"step {i}" for i in range(5)),
                                    "progress 10%", "progress 50%", "progress 100%"]
        assert [ln for ln in mine if ln.startswith("err ")] == [f"err {i}" for i in range(5)]
    assert "Execution Summary" in out and f"RunId: {run.id}" in out and "Status: Completed" in out

    # the log files, in Azure's layout, each with real content
    files = {f["name"]: f for f in worker.get(f"/api/runs/{run.id}/files")}
    assert set(files) == {"azureml-logs/55_azureml-execution-0.txt", "azureml-logs/65_job_prep-0.txt",
                          "azureml-logs/70_driver_log_0.txt", "azureml-logs/70_driver_log_1.txt",
                          "azureml-logs/75_job_post-0.txt", "azureml-logs/process_info.json",
                          "azureml-logs/process_status.json", "logs/azureml/launcher_azureml.log"}
    driver = worker.get(f"/api/runs/{run.id}/logs", file="azureml-logs/70_driver_log_1.txt")["lines"]
    assert [ln["seq"] for ln in driver] == list(range(len(driver))) and len(driver) == 16
    assert {ln["stream"] for ln in driver if ln["line"].startswith("err ")} == {"stderr"}
    assert {ln["rank"] for ln in driver} == {1}
    early, late = (next(ln for ln in driver if ln["line"] == w) for w in ("early", "late"))
    from datetime import datetime
    gap = datetime.fromisoformat(late["ts"]) - datetime.fromisoformat(early["ts"])
    assert gap.total_seconds() >= 1.0, "the script's output reached the launcher only when it exited (buffered)"
    # paged by sequence number
    page = worker.get(f"/api/runs/{run.id}/logs", file="azureml-logs/70_driver_log_1.txt", after_seq=3, limit=2)
    assert [ln["seq"] for ln in page["lines"]] == [4, 5] and page["next_seq"] == 5
    info = json.loads(httpx_text(worker, f"/api/runs/{run.id}/files/azureml-logs/process_info.json"))
    status = json.loads(httpx_text(worker, f"/api/runs/{run.id}/files/azureml-logs/process_status.json"))
    assert [p["rank"] for p in info["processes"]] == [0, 1]
    assert [(p["exit_code"], p["status"]) for p in status["processes"]] == [(0, "Completed"), (0, "Completed")]
    prep = httpx_text(worker, f"/api/runs/{run.id}/files/azureml-logs/65_job_prep-0.txt")
    assert "(by .amlignore)" in prep and "Snapshot stored" in prep
    execution = httpx_text(worker, f"/api/runs/{run.id}/files/azureml-logs/55_azureml-execution-0.txt")
    assert execution.count("Started rank") == 2 and execution.count("exited with code 0") == 2

    # the ranks' metrics went to the submitted run; details with logs; the snapshot comes back as a zip
    assert len(run.get_metrics()["loss"]) == 10
    with_logs = run.get_details_with_logs()
    assert "late" in with_logs["logFiles"]["azureml-logs/70_driver_log_0.txt"].splitlines()
    zpath = run.restore_snapshot(path=tmp_path / "restored.zip")
    assert sorted(zipfile.ZipFile(zpath).namelist()) == [".amlignore", "train.py", "util/helpers.py"]
    # the launcher's own bookkeeping is stored with the run, and kept out of the Azure-shaped details
    assert worker.get(f"/api/runs/{run.id}")["properties"]["_runwatch.processes"] == "2"
    assert not any(k.startswith("_runwatch.") for k in details["properties"])


def test_failed_rank_stops_the_others_raises_and_alerts(stack_env, tmp_path, hook):
    worker = stack_env
    src = source(tmp_path, "train.py", SLEEPER)
    exp = Experiment(Workspace.from_config(), unique_name("fail"))
    run = exp.submit(ScriptRunConfig(source_directory=str(src), script="train.py", arguments=["fail"],
                                     process_count_per_node=2))
    t0 = time.monotonic()
    with pytest.raises(RunFailedError) as info:
        run.wait_for_completion(show_output=False, timeout=90)
    assert time.monotonic() - t0 < 30, "rank 0 should have been stopped when rank 1 failed"
    err = info.value.details["error"]
    assert "rank 1 exited with code 3" in err["message"]
    by_rank = {d["rank"]: d for d in err["details"]}
    assert by_rank[1]["exit_code"] == 3 and by_rank[1]["stderr_tail"] == ["boom: the loss is NaN"]
    assert by_rank[0]["stopped_by_launcher"] is True and by_rank[0]["exit_code"] == -signal.SIGTERM
    assert [h["to"] for h in worker.get(f"/api/runs/{run.id}/history")][-2:] == ["Finalizing", "Failed"]

    alerts = wait_until(lambda: worker.get("/api/alerts", run_id=run.id), 30, what="alert stored")
    assert [a["status"] for a in alerts] == ["Failed"] and "exited with code 3" in alerts[0]["reason"]
    body = wait_until(lambda: hook.for_run(run.id), 30, what="webhook called")[0]
    assert body["status"] == "Failed" and body["alert_id"] == alerts[0]["alert_id"]
    assert body["portal_url"] == run.get_portal_url() == f"{worker.api_url}/runs/{run.id}"
    assert body["details"]["error"]["details"][1]["stderr_tail"] == ["boom: the loss is NaN"]


def test_cancel_from_another_process_stops_every_rank(stack_env, tmp_path):
    worker = stack_env
    src = source(tmp_path, "train.py", SLEEPER)
    exp = Experiment(Workspace.from_config(), unique_name("cancel"))
    run = exp.submit(ScriptRunConfig(source_directory=str(src), script="train.py", process_count_per_node=2))
    pids = pids_of(worker, run.id, 2)
    assert not any(gone(p) for p in pids)
    out = subprocess.run([sys.executable, "-m", "runwatch.cli", "cancel", run.id], capture_output=True, text=True,
                         env=dict(os.environ), cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "cancel requested" in out.stdout
    details = run.wait_for_completion(timeout=60)
    assert details["status"] == "Canceled"
    assert [h["to"] for h in worker.get(f"/api/runs/{run.id}/history")][-2:] == ["CancelRequested", "Canceled"]
    wait_until(lambda: all(gone(p) for p in pids), 10, what="every rank stopped")
    # a finished run cannot be canceled again: a clear error, exit code 1
    again = subprocess.run([sys.executable, "-m", "runwatch.cli", "cancel", run.id], capture_output=True, text=True,
                           env=dict(os.environ), cwd=ROOT, timeout=60)
    assert again.returncode == 1 and "already Canceled" in again.stderr


def test_killed_run_becomes_not_responding_then_failed_with_alerts(stack_env, tmp_path, hook):
    worker = stack_env
    src = source(tmp_path, "train.py", SLEEPER)
    exp = Experiment(Workspace.from_config(), unique_name("lost"))
    run = exp.submit(ScriptRunConfig(source_directory=str(src), script="train.py", process_count_per_node=2))
    pids = pids_of(worker, run.id, 2)
    wait_until(lambda: worker.get(f"/api/runs/{run.id}/logs", file="azureml-logs/70_driver_log_1.txt")["lines"],
               30, what="rank 1's first line stored")
    # the whole run vanishes at once, as when its machine is gone
    for pid in [run.launcher.pid, *pids]:
        os.kill(pid, signal.SIGKILL)
    run.launcher.wait(10)
    t0 = time.monotonic()
    wait_until(status_is(run, "NotResponding", "Failed"), 30, what="NotResponding")
    wait_until(status_is(run, "Failed"), 30, what="Failed after NotResponding")
    elapsed = time.monotonic() - t0
    history = [h["to"] for h in worker.get(f"/api/runs/{run.id}/history")]
    assert history[-3:] == ["Running", "NotResponding", "Failed"]
    error = run.get_details()["error"]
    assert error["code"] == "NotResponding" and "no heartbeat" in error["message"]
    alerts = wait_until(lambda: (a := worker.get("/api/alerts", run_id=run.id)) and len(a) == 2 and a, 30,
                        what="two alerts")
    assert sorted(a["status"] for a in alerts) == ["Failed", "NotResponding"]
    tail = alerts[0]["details"]["log_tail"]
    assert tail["azureml-logs/70_driver_log_1.txt"] == [f"rank 1 pid {pids[1]}"]
    bodies = wait_until(lambda: len(hook.for_run(run.id)) == 2 and hook.for_run(run.id), 30, what="webhook x2")
    assert sorted(b["status"] for b in bodies) == ["Failed", "NotResponding"]
    assert elapsed < 20


def test_runs_queue_for_compute_slots(stack_env, tmp_path):
    worker = stack_env
    src = source(tmp_path, "train.py", SLEEPER)
    exp = Experiment(Workspace.from_config(), unique_name("queue"))
    cfg = dict(source_directory=str(src), script="train.py", compute_target="single",
               environment_variables={"SLEEP": "2"})
    first = exp.submit(ScriptRunConfig(**cfg))
    wait_until(status_is(first, "Running"), 30, what="first run Running")
    second = exp.submit(ScriptRunConfig(**cfg))
    view = wait_until(lambda: (c := worker.get("/api/compute/single"))["queued"] and c, 30, what="second queued")
    assert [r["run_id"] for r in view["running"]] == [first.id] and view["slots_in_use"] == 1 and view["slots"] == 1
    assert [r["run_id"] for r in view["queued"]] == [second.id]
    assert second.get_status() == "Queued"
    d1 = first.wait_for_completion(timeout=60)
    d2 = second.wait_for_completion(timeout=60)
    assert d1["status"] == d2["status"] == "Completed"
    assert d2["startTimeUtc"] >= d1["endTimeUtc"], "the second run started before the first gave its slot back"
    out = subprocess.run([sys.executable, "-m", "runwatch.cli", "clusters", "--json"], capture_output=True, text=True,
                         env=dict(os.environ), cwd=ROOT, timeout=60)
    assert {c["name"]: c["slots"] for c in json.loads(out.stdout)} == {"local": 4, "single": 1}


def test_cli_submit_files_and_logs(stack_env, tmp_path):
    src = source(tmp_path, "train.py", """
        import sys
        print("args:", *sys.argv[1:])
        print("to stderr", file=sys.stderr)
    """)
    env = dict(os.environ)
    name = unique_name("cli")
    out = subprocess.run([sys.executable, "-m", "runwatch.cli", "submit", "-e", name, "--source-dir", str(src),
                          "train.py", "--lr", "0.1"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "args: --lr 0.1" in out.stdout and "Status: Completed" in out.stdout
    run_id = out.stdout.split("RunId: ", 1)[1].split()[0]
    listed = subprocess.run([sys.executable, "-m", "runwatch.cli", "files", run_id, "--json"], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=60)
    names = [f["name"] for f in json.loads(listed.stdout)]
    assert "azureml-logs/70_driver_log_0.txt" in names and "azureml-logs/process_status.json" in names
    logs = subprocess.run([sys.executable, "-m", "runwatch.cli", "logs", run_id], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
    assert logs.stdout.splitlines() == ["args: --lr 0.1", "to stderr"]
    one = subprocess.run([sys.executable, "-m", "runwatch.cli", "logs", run_id, "--file",
                          "azureml-logs/75_job_post-0.txt"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=60)
    assert one.stdout.startswith("Rank 0: exit code 0")
    bad = subprocess.run([sys.executable, "-m", "runwatch.cli", "submit", "-e", name, "--source-dir", str(src),
                          "--procs", "9", "train.py"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "needs 9 process slots" in bad.stderr


def test_reopened_run_can_be_failed_from_another_process(stack_env, tmp_path):
    src = source(tmp_path, "train.py", SLEEPER)
    ws = Workspace.from_config()
    exp = Experiment(ws, unique_name("extfail"))
    run = exp.submit(ScriptRunConfig(source_directory=str(src), script="train.py"))
    pids = pids_of(stack_env, run.id, 1)
    wait_until(status_is(run, "Running"), 30, what="Running")
    Run.get(ws, run.id).fail(error_details="stopped by the operator", error_code="Operator")
    details = run.wait_for_completion(raise_on_error=False, timeout=60)
    assert details["status"] == "Failed" and details["error"]["message"] == "stopped by the operator"
    wait_until(lambda: gone(pids[0]), 30, what="the rank stopped after the run was failed elsewhere")


def test_two_nodes_and_a_run_over_its_time_limit(stack_env, tmp_path):
    worker = stack_env
    src = source(tmp_path, "train.py", """
        import os, time
        print("node", os.environ["NODE_RANK"], "rank", os.environ["RANK"], "local", os.environ["LOCAL_RANK"])
        time.sleep(600)
    """)
    exp = Experiment(Workspace.from_config(), unique_name("limit"))
    run = exp.submit(ScriptRunConfig(source_directory=str(src), script="train.py", node_count=2,
                                     max_run_duration_seconds=3))
    details = run.wait_for_completion(raise_on_error=False, timeout=60)
    assert details["status"] == "Failed" and details["error"]["code"] == "RunTimeout"
    assert 3 <= details["durationSeconds"] < 15
    files = {f["name"] for f in worker.get(f"/api/runs/{run.id}/files")}
    assert {"azureml-logs/55_azureml-execution-1.txt", "azureml-logs/65_job_prep-1.txt",
            "azureml-logs/75_job_post-1.txt", "azureml-logs/70_driver_log_1.txt"} <= files
    line = worker.get(f"/api/runs/{run.id}/logs", file="azureml-logs/70_driver_log_1.txt")["lines"][0]
    assert line["line"] == "node 1 rank 1 local 0" and line["node"] == 1


def test_logs_follow_prints_until_the_run_ends(stack_env, tmp_path):
    src = source(tmp_path, "train.py", """
        import time
        for i in range(8):
            print(f"tick {i}")
            time.sleep(0.25)
    """)
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "runwatch.cli", "submit", "-e", unique_name("follow"), "--no-wait",
                          "--source-dir", str(src), "train.py"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=60)
    run_id = out.stdout.strip()
    assert out.returncode == 0 and run_id.startswith("follow-"), out.stderr
    followed = subprocess.run([sys.executable, "-m", "runwatch.cli", "logs", run_id, "--follow"], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=60)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.splitlines() == [f"tick {i}" for i in range(8)]

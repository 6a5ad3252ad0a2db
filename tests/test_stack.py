"""`runwatch up|down|status` as a user runs them: real processes under a temporary RUNWATCH_HOME."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from conftest import ROOT, wait_until
from runwatch.core.net import pid_alive


def rw(home, *args, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
    env["RUNWATCH_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "runwatch.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def test_up_status_restart_down_and_two_stacks(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    try:
        out = rw(a, "up")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "runwatch is up" in out.stdout and "started: broker, worker" in out.stdout
        rec_a = json.loads((a / "stack.json").read_text())
        st = json.loads(rw(a, "status", "--json").stdout)
        assert st["running"] and st["worker"]["health"]["ready"] and st["broker"]["alive"]
        assert set(st["worker"]["health"]["rows"]) >= {"metric_points", "runs", "log_lines"}

        again = rw(a, "up")
        assert again.returncode == 0 and "already running" in again.stdout
        assert json.loads((a / "stack.json").read_text())["worker_pid"] == rec_a["worker_pid"]

        os.kill(rec_a["worker_pid"], signal.SIGKILL)  # a part dies: the next `up` restarts only that part
        wait_until(lambda: not pid_alive(rec_a["worker_pid"]), 10, what="worker gone")
        restarted = rw(a, "up")
        assert restarted.returncode == 0 and "started: worker" in restarted.stdout, restarted.stdout
        rec_a2 = json.loads((a / "stack.json").read_text())
        assert rec_a2["broker_pid"] == rec_a["broker_pid"] and rec_a2["worker_pid"] != rec_a["worker_pid"]

        out_b = rw(b, "up")  # a second home beside the first: other ports, recorded under its home
        assert out_b.returncode == 0, out_b.stdout + out_b.stderr
        rec_b = json.loads((b / "stack.json").read_text())
        assert rec_b["bootstrap_servers"] != rec_a2["bootstrap_servers"] and rec_b["api_url"] != rec_a2["api_url"]
        assert json.loads(rw(b, "experiments", "--json").stdout) == []
    finally:
        # the subprocess limit is above down's own (--timeout 120 by default, then it saves what is unstored):
        # on a loaded machine a restarted worker can take long to rejoin, and down must still end by itself
        down_a, down_b = rw(a, "down", timeout=300), rw(b, "down", timeout=300)
    assert "stopped: worker, broker" in down_a.stdout and "stopped: worker, broker" in down_b.stdout
    assert not pid_alive(rec_a2["worker_pid"]) and not pid_alive(rec_a2["broker_pid"])
    gone = rw(a, "runs", "list")
    assert gone.returncode == 3 and "runwatch up" in gone.stderr
    st = rw(a, "status")
    assert st.returncode == 3 and "not running" in st.stderr


def test_demo_submits_the_sample_as_a_two_process_run_and_shows_it_live(tmp_path):
    out = rw(tmp_path / "demo", "demo", "--steps", "30", "--no-keep", timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "2 processes of samples/train.py" in text
    for rank in (0, 1):
        assert f"[rank {rank}] rank {rank} of 2: 30 steps" in text
        assert f"[rank {rank}] rank {rank} done" in text
    assert "Completed" in text and "30/30" in text
    assert "get_metrics() of sample_" in text and "loss: [0.6931" in text
    assert "keeps running" not in text and not (tmp_path / "demo" / "stack.json").exists()  # --no-keep: it is down

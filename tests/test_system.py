"""System metrics (producers/system.py): sampled in the training process, stored under system/, kept out of
get_metrics() unless asked for; per rank in a submitted run; no GPU is not an error."""

from __future__ import annotations

import os
import textwrap
import time

import psutil
import pytest

from conftest import metric_series, unique_name, wait_until
from runwatch import Experiment, ScriptRunConfig, Workspace
from runwatch.producers import system
from runwatch.producers.values import MetricError

PROCESS = {"cpu_percent", "rss_mb", "threads", "open_files", "read_mb", "write_mb"}
NODE = {"cpu_percent", "memory_percent", "memory_used_mb", "disk_percent", "disk_read_mb", "disk_write_mb",
        "net_sent_mb", "net_recv_mb"}


def test_a_sample_has_every_figure_with_plausible_values():
    s = system.Sampler(system.Layout({}))
    sum(i * i for i in range(300_000))  # some CPU between the start of the interval and the sample
    got = s.sample()
    assert {k for k in got if k.startswith("system/process/")} == {f"system/process/{n}" for n in PROCESS}
    assert {k for k in got if k.startswith("system/node/")} == {f"system/node/{n}" for n in NODE}
    rss = psutil.Process().memory_info().rss / (1 << 20)
    assert 0.5 * rss < got["system/process/rss_mb"] < 2 * rss
    assert got["system/process/threads"] >= 1 and got["system/process/open_files"] >= 0
    assert 0 <= got["system/process/cpu_percent"] <= 100 * os.cpu_count() + 1
    assert 0 <= got["system/node/cpu_percent"] <= 100 and 0 < got["system/node/memory_percent"] < 100
    total = psutil.virtual_memory().total / (1 << 20)
    assert 0 < got["system/node/memory_used_mb"] < total
    assert 0 < got["system/node/disk_percent"] <= 100 and got["system/node/net_recv_mb"] >= 0


def test_without_a_gpu_the_gpu_part_is_absent_and_says_why():
    gpu = system.Gpu(system.Layout({}))
    if gpu.available:  # a machine with a GPU and a driver: every figure NVML reports for it
        got = system.Sampler(system.Layout({})).sample()
        assert {"system/gpu/utilization_percent", "system/gpu/memory_used_mb"} <= set(got)
        assert 0 <= got["system/gpu/utilization_percent"] <= 100
    else:
        assert gpu.why and gpu.sample() == {}
        assert not any("/gpu/" in k for k in system.Sampler(system.Layout({})).sample())


def test_each_rank_names_its_figures_and_only_local_rank_0_reports_the_node():
    r1 = system.Layout({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "GROUP_RANK": "1"})
    assert (r1.process_prefix(), r1.node_prefix(), r1.reports_node) == ("system/rank3/", "system/node1/", False)
    got = system.Sampler(r1).sample()
    assert {k.rsplit("/", 1)[0] for k in got} <= {"system/rank3/process", "system/rank3/gpu"}
    r0 = system.Layout({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "GROUP_RANK": "1"})
    assert {k.rsplit("/", 1)[0] for k in system.Sampler(r0).sample()} >= {"system/rank2/process", "system/node1/node"}
    # the GPU a rank uses: its local rank's entry in CUDA_VISIBLE_DEVICES
    assert system.Gpu.device_index(r1, 4, visible="2,3") == 3 and system.Gpu.device_index(r1, 4, visible="") == 1
    assert system.Gpu.device_index(r1, 2, visible="GPU-aaaa,GPU-bbbb") == 1


def test_a_run_gets_system_metrics_apart_from_its_own(stack_env, monkeypatch):
    monkeypatch.setenv("RUNWATCH_SYSTEM_METRICS", "true")  # the default (tests/conftest.py turns it off)
    monkeypatch.setenv("RUNWATCH_SYSTEM_METRICS_INTERVAL", "0.5")
    run = Experiment(Workspace.from_config(), unique_name("sys")).start_logging()
    for i in range(5):
        run.log("loss", 1.0 / (i + 1))
    with pytest.raises(MetricError, match="names under 'system/' are runwatch's system metrics"):
        run.log("system/mine", 1.0)
    wait_until(lambda: len(metric_series(run, "system/process/rss_mb")) >= 3, 30, what="3 system samples")
    run.complete()
    assert set(run.get_metrics()) == {"loss"}  # the user's metrics, as before
    everything = run.get_metrics(include_system=True)
    assert {f"system/process/{n}" for n in PROCESS} | {f"system/node/{n}" for n in NODE} | {"loss"} <= set(everything)
    rss = everything["system/process/rss_mb"]
    assert isinstance(rss, list) and all(10 < v < 64_000 for v in rss)
    # nothing is sampled into a finished run
    n = len(rss)
    time.sleep(1.5)
    assert len(metric_series(run, "system/process/rss_mb")) == n


def test_system_metrics_off_by_a_setting(stack_env, monkeypatch):
    monkeypatch.setenv("RUNWATCH_SYSTEM_METRICS", "false")
    monkeypatch.setenv("RUNWATCH_SYSTEM_METRICS_INTERVAL", "0.3")
    run = Experiment(Workspace.from_config(), unique_name("nosys")).start_logging()
    run.log("acc", 0.5)
    time.sleep(1.5)
    run.complete()
    assert run.get_metrics(include_system=True) == {"acc": 0.5}


def test_every_rank_of_a_submitted_run_reports_its_own(stack_env, tmp_path, monkeypatch):
    monkeypatch.setenv("RUNWATCH_SYSTEM_METRICS", "true")
    monkeypatch.setenv("RUNWATCH_SYSTEM_METRICS_INTERVAL", "0.5")
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.py").write_text(textwrap.dedent("""
        import time
        from runwatch import Run
        run = Run.get_context()
        for i in range(3):
            run.log("loss", 1.0 / (i + 1))
            time.sleep(0.8)
    """))
    run = Experiment(Workspace.from_config(), unique_name("sysranks")).submit(
        ScriptRunConfig(source_directory=str(src), script="train.py", process_count_per_node=2))
    assert run.wait_for_completion(timeout=180)["status"] == "Completed"
    names = set(run.get_metrics(include_system=True))
    assert {"system/rank0/process/rss_mb", "system/rank1/process/rss_mb", "system/node0/node/cpu_percent"} <= names
    assert not any(n.startswith("system/rank1/node") or n.startswith("system/node1/") for n in names)
    assert set(run.get_metrics()) == {"loss"}


CAPTURED = """
import logging, sys, warnings
from runwatch import Experiment, Workspace
run = Experiment(Workspace.from_config(), sys.argv[1]).start_logging({capture})
print("hello from", "the script")
print("two", end="")
print(" parts")
sys.stderr.write("an error line\\n")
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
logging.getLogger("train.data").info("loaded 3 batches")
warnings.warn("lr is high", UserWarning)
for i in range(3):
    print(f"progress {{i}}", end="\\r")
print()
print(run.id)
run.complete()
print("after the run")
"""


def _script_run(tmp_path, capture: str):
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(CAPTURED.format(capture=capture)))
    out = subprocess.run([sys.executable, str(script), unique_name("cap")], capture_output=True, timeout=120,
                         cwd=tmp_path)  # bytes: the terminal's '\r's as printed
    out.stdout, out.stderr = out.stdout.decode(), out.stderr.decode()
    assert out.returncode == 0, out.stdout + out.stderr
    run_id = out.stdout.strip().split("\n")[-2].strip()
    return out, Workspace.from_config().get_run(run_id)


def _file(run, tmp_path, name):
    return open(run.download_file(name, tmp_path / name.replace("/", "_"))).read().splitlines()


def test_a_scripts_output_logging_and_warnings_are_captured_and_still_printed(stack_env, tmp_path, monkeypatch):
    monkeypatch.setenv("RUNWATCH_CAPTURE_OUTPUT", "auto")  # the default: on in a script
    out, run = _script_run(tmp_path, "")  # the default in a script: on
    # the terminal gets everything, unchanged
    assert out.stdout.startswith("hello from the script\ntwo parts\nprogress 0\rprogress 1\rprogress 2\r\n")
    assert out.stdout.endswith("after the run\n")
    assert "an error line" in out.stderr and "INFO train.data loaded 3 batches" in out.stderr
    assert "UserWarning: lr is high" in out.stderr
    wait_until(lambda: {"azureml-logs/70_driver_log_0.txt", "logs/train.data.log", "logs/py.warnings.log"}
               <= set(run.get_file_names()), 30, what="the captured log files")
    driver = _file(run, tmp_path, "azureml-logs/70_driver_log_0.txt")
    assert driver[:4] == ["hello from the script", "two parts", "an error line", "INFO train.data loaded 3 batches"]
    assert any("UserWarning: lr is high" in ln for ln in driver)
    assert [ln for ln in driver if ln.startswith("progress")] == ["progress 0", "progress 1", "progress 2"]
    assert driver[-1] == run.id and "after the run" not in driver  # the run ended: nothing after it
    assert _file(run, tmp_path, "logs/train.data.log")[0].endswith("INFO train.data: loaded 3 batches")
    assert any("lr is high" in ln for ln in _file(run, tmp_path, "logs/py.warnings.log"))


def test_capture_output_false_captures_nothing(stack_env, tmp_path):
    out, run = _script_run(tmp_path, "capture_output=False")
    assert "hello from the script" in out.stdout
    time.sleep(1.0)
    assert not [n for n in run.get_file_names() if n.startswith(("azureml-logs/70_driver", "logs/"))]

"""Unit tests of the submitted-run parts that need no stack: config checks, snapshots, slots, log lines,
lost-run detection, file names."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from runwatch.processors.logic import RunStateLogic, update_tails
from runwatch.producers.compute import SlotPool
from runwatch.producers.config import ConfigError, ScriptRunConfig
from runwatch.producers.logs import LogWriter
from runwatch.producers.snapshot import SnapshotError, collect, make_snapshot
from runwatch.core.events import LivenessCheck, LogBatch, RunCreated, RunStatus, StatusChanged, make_envelope
from runwatch.core.settings import Settings
from runwatch.core.errors import FileError
from runwatch.core.names import safe_name
from runwatch.api.filestore import FileStore


@pytest.fixture
def settings(tmp_path):
    return Settings.load(home=tmp_path / "home", compute_targets="local=2,gpu=8")


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "train.py").write_text("print('hi')\n")
    return d


@pytest.mark.parametrize("change, message", [
    (dict(script=None), "script is required"),
    (dict(script="missing.py"), "script 'missing.py' is not a file"),
    (dict(source_directory="/nonexistent/dir"), "source_directory"),
    (dict(node_count=0), "node_count must be an integer >= 1"),
    (dict(process_count_per_node=True), "process_count_per_node must be an integer"),
    (dict(compute_target="tpu"), "compute_target 'tpu' is not configured; known: local (2 slots), gpu (8 slots)"),
    (dict(process_count_per_node=3), "needs 3 process slots (1 node(s) x 3 process(es)); compute 'local' has 2"),
    (dict(environment_variables={"A": 1}), "environment_variables must map names to string values"),
    (dict(arguments="--lr 1"), "arguments must be a list"),
    (dict(max_run_duration_seconds=0), "max_run_duration_seconds must be > 0"),
])
def test_config_errors_name_the_field(settings, src, change, message):
    cfg = ScriptRunConfig(**{"source_directory": str(src), "script": "train.py", **change})
    with pytest.raises(ConfigError) as info:
        cfg.check(settings)
    assert message in str(info.value)


def test_config_that_fits_passes(settings, src):
    ScriptRunConfig(source_directory=str(src), script="train.py", compute_target="gpu", node_count=2,
                    process_count_per_node=4, environment_variables={"A": "1"}).check(settings)


def test_malformed_compute_targets_setting_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'gpu=none' must be NAME=SLOTS"):
        Settings.load(home=tmp_path, compute_targets="local=2,gpu=none").compute()


def test_snapshot_honours_amlignore_over_gitignore(src, tmp_path):
    (src / ".gitignore").write_text("*.py\n")
    (src / ".amlignore").write_text("data/\n*.ckpt\n!keep.ckpt\n")
    (src / "data").mkdir()
    (src / "data" / "x.csv").write_text("1")
    (src / "model.ckpt").write_text("w")
    (src / "keep.ckpt").write_text("w")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    files, ignored, used = collect(src)
    assert used == ".amlignore"
    assert sorted(n for _, n in files) == [".amlignore", ".gitignore", "keep.ckpt", "train.py"]
    (src / ".amlignore").unlink()
    files, _, used = collect(src)
    assert used == ".gitignore" and "train.py" not in [n for _, n in files]


def test_snapshot_over_the_limit_is_refused_naming_the_largest_file(src, tmp_path):
    (src / "weights.bin").write_bytes(b"\0" * 4096)
    with pytest.raises(SnapshotError, match=r"weights.bin .*\.amlignore"):
        make_snapshot(src, tmp_path / "s.zip", max_bytes=1000)
    assert not (tmp_path / "s.zip").exists()


def test_slots_are_first_come_first_served_and_freed_when_released(tmp_path):
    pool = SlotPool(tmp_path, "local", 2)
    held = pool.acquire("a", 2, lambda: False)
    assert len(held) == 2
    got: list = []
    t = threading.Thread(target=lambda: got.append(pool.acquire("b", 1, lambda: False, poll=0.02)))
    t.start()
    time.sleep(0.2)
    assert got == []                     # no free slot: b waits in the queue
    assert pool.acquire("c", 1, lambda: True, poll=0.02) is None  # c gives up (a cancel while queued)
    SlotPool.release(held)
    t.join(5)
    assert len(got[0]) == 1
    with pytest.raises(ValueError, match="cannot fit"):
        pool.acquire("d", 3, lambda: False)


class _Sink:
    def __init__(self):
        self.sent = []

    def send_control(self, run_id, experiment, payload):
        self.sent.append(payload)


def test_log_writer_keeps_one_sequence_per_file_and_splits_streams_and_long_lines():
    em = _Sink()
    w = LogWriter(em, "r", "e", max_line=10)
    w.line("f", "a", "stdout")
    w.line("f", "b", "stderr")
    w.line("g", "x" * 25, "stdout")
    w.line("f", "c", "stdout")
    assert w.flush() == 4
    f_batches = [b for b in em.sent if b.file == "f"]
    assert [(b.stream, b.first_seq, b.lines) for b in f_batches] == [
        ("stdout", 0, ["a"]), ("stderr", 1, ["b"]), ("stdout", 2, ["c"])]
    g = next(b for b in em.sent if b.file == "g")
    assert g.lines == ["x" * 10, "x" * 10, "x" * 5] and w.counts == {"f": 3, "g": 3}


def _env(run_id, payload, seq):
    return make_envelope(run_id, "e", payload, seq)


def test_liveness_moves_a_silent_run_to_not_responding_then_failed():
    logic = RunStateLogic()
    st = RunStateLogic.new_state("r", "e")
    logic.handle(_env("r", RunCreated(created_ts=100.0, status=RunStatus.Running), 0), st, now=100.0)
    assert RunStateLogic.liveness_check(st, 101.0, since=0, heartbeat_timeout=2, not_responding_timeout=2) is None
    check = RunStateLogic.liveness_check(st, 103.0, since=0, heartbeat_timeout=2, not_responding_timeout=2)
    assert check.to_status == RunStatus.NotResponding
    # a worker that just started has heard nobody yet: no verdict before heartbeat_timeout from its start
    assert RunStateLogic.liveness_check(st, 103.0, since=102.0, heartbeat_timeout=2,
                                        not_responding_timeout=2) is None
    out = logic.handle(make_envelope("r", "e", check, 1), st, now=103.0,
                       tails={"azureml-logs/70_driver_log_0.txt": ["last"]})
    assert st["status"] == "NotResponding"
    alert = next(env.payload for topic, _, env in out if topic == "alerts")
    assert alert.details["log_tail"] == {"azureml-logs/70_driver_log_0.txt": ["last"]}
    check2 = RunStateLogic.liveness_check(st, st["not_responding_since"] + 3, since=0, heartbeat_timeout=2,
                                          not_responding_timeout=2)
    assert check2.to_status == RunStatus.Failed
    logic.handle(make_envelope("r", "e", check2, 2), st, now=110.0)
    assert st["status"] == "Failed" and st["error"]["code"] == "NotResponding"


def test_a_stale_liveness_check_is_not_applied():
    logic = RunStateLogic()
    st = RunStateLogic.new_state("r", "e")
    logic.handle(_env("r", RunCreated(created_ts=100.0, status=RunStatus.Running), 0), st, now=100.0)
    check = RunStateLogic.liveness_check(st, 103.0, since=0, heartbeat_timeout=2, not_responding_timeout=2)
    logic.handle(_env("r", StatusChanged(status=RunStatus.Running), 1), st, now=103.5)  # the run spoke meanwhile
    assert logic.handle(make_envelope("r", "e", check, 9), st, now=104.0) == []
    assert st["status"] == "Running"


def test_cancel_requested_with_nobody_left_becomes_canceled():
    logic = RunStateLogic()
    st = RunStateLogic.new_state("r", "e")
    logic.handle(_env("r", RunCreated(created_ts=100.0, status=RunStatus.Running), 0), st, now=100.0)
    logic.handle(_env("r", StatusChanged(status=RunStatus.CancelRequested), 1), st, now=100.0)
    check = RunStateLogic.liveness_check(st, 103.0, since=0, heartbeat_timeout=2, not_responding_timeout=2)
    assert isinstance(check, LivenessCheck) and check.to_status == RunStatus.Canceled


def test_log_tails_keep_the_last_lines_of_driver_logs_only():
    tails: dict = {}
    ts = np.zeros(15, "<i8").tobytes()
    update_tails(tails, LogBatch(file="azureml-logs/70_driver_log_0.txt", first_seq=0, ts=ts,
                                 lines=[str(i) for i in range(15)]))
    assert not update_tails(tails, LogBatch(file="azureml-logs/55_azureml-execution-0.txt", first_seq=0,
                                            ts=ts[:8], lines=["x"]))
    assert tails == {"azureml-logs/70_driver_log_0.txt": [str(i) for i in range(5, 15)]}


@pytest.mark.parametrize("name", ["../etc/passwd", "/abs/path", "a/../../b", "x\x00y", "", "C:\\win",
                                  ".runwatch-meta/x", "a/" * 600])
def test_hostile_file_names_are_refused(name):
    with pytest.raises(FileError):
        safe_name(name)


def test_file_names_are_kept_as_given_or_refused():
    for name in ("outputs/model.txt", "model.txt#backup", "notes?.txt", "x%2Fy", "ünï/cödé.bin", "a b"):
        assert safe_name(name) == name
    with pytest.raises(FileError, match="would be stored as 'outputs/model.txt'"):
        safe_name("./outputs//model.txt")
    with pytest.raises(FileError, match="backslash"):
        safe_name("outputs\\plots\\a.png")
    with pytest.raises(FileError, match="control character"):
        safe_name("a\nb")


def test_file_store_keeps_nothing_from_a_damaged_upload(tmp_path):
    store = FileStore(tmp_path)

    async def chunks():
        yield b"hello "
        yield b"world"

    with pytest.raises(FileError, match="checksum mismatch"):
        asyncio.run(store.write("run1", "outputs/a.txt", chunks(), sha256="0" * 64, max_bytes=100))
    assert store.list("run1") == []
    with pytest.raises(FileError, match="larger than the limit of 5 bytes"):
        asyncio.run(store.write("run1", "outputs/a.txt", chunks(), max_bytes=5))
    assert store.list("run1") == []
    meta = asyncio.run(store.write("run1", "outputs/a.txt", chunks(), max_bytes=100))
    assert store.path("run1", "outputs/a.txt").read_bytes() == b"hello world"
    assert store.list("run1") == [meta] and meta["size"] == 11 and meta["content_type"] == "text/plain"


def test_portal_url_opens_grafanas_run_dashboard_when_grafana_is_configured(tmp_path):
    plain = Settings.load(home=tmp_path, api_url="http://api:8765/")
    assert plain.portal_url("exp_1 x") == "http://api:8765/runs/exp_1%20x"
    grafana = Settings.load(home=tmp_path, api_url="http://api:8765", grafana_url="https://grafana.example/")
    assert grafana.portal_url("exp_1") == "https://grafana.example/d/runwatch-run/runwatch-run?var-run_id=exp_1"

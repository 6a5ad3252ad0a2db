"""Run files and images through the real stack: uploads, downloads, outputs/, images, hostile names, cut uploads."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, unique_name, wait_until
from runwatch import Experiment, ScriptRunConfig, Workspace
from runwatch.core.errors import FileError


def files_of(worker, run_id, *, when=None):
    def check():
        got = {f["name"]: f for f in worker.get(f"/api/runs/{run_id}/files")}
        return got if when is None or when(got) else None
    return wait_until(check, 30, 0.1, what=f"files of {run_id}")


class OneWay:
    """A stream that can only be read once, front to back (a pipe, a socket)."""

    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._buf.read(n)


def test_text_binary_and_stream_uploads_round_trip_byte_for_byte(stack_env, tmp_path):
    worker = stack_env
    run = Experiment(Workspace.from_config(), unique_name("files")).start_logging()
    text = tmp_path / "model.txt"
    text.write_text("weights: 1 2 3\nbias: 0.5\n")
    blob = os.urandom(3 * (1 << 20) + 17)
    meta = run.upload_file(name="outputs/model.txt", path_or_stream=str(text))
    assert meta["size"] == text.stat().st_size and meta["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    run.upload_file("data/blob.bin", io.BytesIO(blob))
    run.upload_file("data/once.bin", OneWay(blob[:1000]))
    folder = tmp_path / "plots"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.csv").write_text("x,y\n1,2\n")
    (folder / "sub" / "b.csv").write_text("x,y\n3,4\n")
    run.upload_folder(name="outputs/plots", path=folder)

    names = set(run.get_file_names())
    assert {"outputs/model.txt", "data/blob.bin", "data/once.bin", "outputs/plots/a.csv",
            "outputs/plots/sub/b.csv"} <= names
    assert Path(run.download_file("outputs/model.txt", tmp_path / "back.txt")).read_bytes() == text.read_bytes()
    assert Path(run.download_file("data/blob.bin", tmp_path)).read_bytes() == blob
    assert Path(run.download_file("data/once.bin", tmp_path / "once")).read_bytes() == blob[:1000]
    written = run.download_files(prefix="outputs/plots", output_directory=tmp_path / "out")
    assert sorted(Path(p).relative_to(tmp_path / "out").as_posix() for p in written) == [
        "outputs/plots/a.csv", "outputs/plots/sub/b.csv"]
    assert (tmp_path / "out" / "outputs/plots/sub/b.csv").read_text() == "x,y\n3,4\n"
    # the pipeline carried the FileStored events: the listing knows where each file came from
    listed = files_of(worker, run.id, when=lambda g: all(g.get(n, {}).get("origin") for n in names))
    assert {listed[n]["origin"] for n in names} == {"upload"}
    assert listed["data/blob.bin"]["size"] == len(blob) and listed["data/blob.bin"]["kind"] == "file"
    run.complete()


def test_fifty_megabytes_stream_with_bounded_memory(stack_env, tmp_path):
    run = Experiment(Workspace.from_config(), unique_name("big")).start_logging()
    src = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with open(src, "wb") as fh:
        for _ in range(50):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            fh.write(chunk)
    tracemalloc.start()
    try:
        run.upload_file("checkpoints/big.bin", str(src))
        _, up_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        back = Path(run.download_file("checkpoints/big.bin", tmp_path / "back.bin"))
        _, down_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert up_peak < 8 << 20 and down_peak < 8 << 20, (up_peak, down_peak)
    with open(back, "rb") as fh:
        assert hashlib.file_digest(fh, "sha256").hexdigest() == digest.hexdigest()
    run.complete()


def test_images_are_metrics_of_kind_image_and_their_files_are_what_was_logged(stack_env, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt
    import numpy as np

    worker = stack_env
    run = Experiment(Workspace.from_config(), unique_name("img")).start_logging()
    x = np.linspace(-3, 3, 50)
    plt.figure(figsize=(3, 2), dpi=50)
    plt.plot(x, np.tanh(x))
    run.log_image(name="Hyperbolic Tangent", plot=plt)
    plt.close("all")
    png = tmp_path / "given.png"
    fig = plt.figure(figsize=(2, 2), dpi=40)
    fig.savefig(png)
    run.log_image(name="confusion", path=str(png))
    run.log_image(name="confusion", path=str(png))
    with pytest.raises(Exception, match="exactly one of path= .* or plot="):
        run.log_image(name="neither")
    run.complete()

    m = wait_until(lambda: (g := run.get_metrics()).get("confusion") and len(g["confusion"]) == 2 and g, 30,
                   what="image metrics")
    assert m["Hyperbolic Tangent"] == "images/Hyperbolic Tangent_0.png"
    assert m["confusion"] == ["images/confusion_0.png", "images/confusion_1.png"]
    assert Path(run.download_file("images/confusion_1.png", tmp_path / "c.png")).read_bytes() == png.read_bytes()
    drawn = mpimg.imread(run.download_file(m["Hyperbolic Tangent"], tmp_path / "t.png"))
    assert drawn.shape[:2] == (100, 150)
    listed = files_of(worker, run.id, when=lambda g: g.get("images/confusion_1.png", {}).get("origin"))
    assert listed["images/Hyperbolic Tangent_0.png"]["origin"] == "image"
    out = subprocess.run([sys.executable, "-m", "runwatch.cli", "metrics", run.id, "--json"], capture_output=True,
                         text=True, env=dict(os.environ), cwd=ROOT, timeout=60)
    assert json.loads(out.stdout)["confusion"] == ["images/confusion_0.png", "images/confusion_1.png"]


def test_outputs_are_collected_on_complete_and_an_oversized_one_is_refused(stack_env, tmp_path, monkeypatch):
    worker = stack_env
    monkeypatch.setenv("RUNWATCH_MAX_FILE_BYTES", "4096")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "sub").mkdir(parents=True)
    (tmp_path / "outputs" / "metrics.json").write_text('{"acc": 0.9}')
    (tmp_path / "outputs" / "sub" / "notes.txt").write_text("ok")
    (tmp_path / "outputs" / "huge.bin").write_bytes(b"\0" * 5000)
    run = Experiment(Workspace.from_config(), unique_name("outputs")).start_logging()
    with pytest.raises(FileError, match=r"outputs/huge.bin' is 5000 bytes; the limit is 4096"):
        run.complete()
    listed = files_of(worker, run.id, when=lambda g: len(g) == 2 and all(f["origin"] for f in g.values()))
    assert set(listed) == {"outputs/metrics.json", "outputs/sub/notes.txt"}
    assert {f["origin"] for f in listed.values()} == {"outputs"}
    assert run.get_status() == "Completed"
    assert Path(run.download_file("outputs/metrics.json", tmp_path / "m.json")).read_text() == '{"acc": 0.9}'


def test_a_submitted_runs_outputs_are_collected(stack_env, tmp_path):
    worker = stack_env
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.py").write_text(textwrap.dedent("""
        import os, json
        os.makedirs("outputs", exist_ok=True)
        with open("outputs/result.json", "w") as fh:
            json.dump({"rank": int(os.environ["RANK"])}, fh)
        print("wrote outputs/result.json")
    """))
    run = Experiment(Workspace.from_config(), unique_name("subout")).submit(
        ScriptRunConfig(source_directory=str(src), script="train.py"))
    # generous: two test files run at once (./dev test), and the launcher, the worker and the broker share 2 cores
    assert run.wait_for_completion(timeout=180)["status"] == "Completed"
    names = run.get_file_names()
    assert "outputs/result.json" in names and "azureml-logs/70_driver_log_0.txt" in names
    assert json.loads(Path(run.download_file("outputs/result.json", tmp_path / "r.json")).read_text()) == {"rank": 0}
    post = httpx.get(f"{worker.api_url}/api/runs/{run.id}/files/azureml-logs/75_job_post-0.txt", timeout=10).text
    assert "Collected 1 file(s) from outputs/" in post
    # a log file downloads like any other file
    assert Path(run.download_file("azureml-logs/75_job_post-0.txt", tmp_path / "post.txt")).read_text() == post


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd", "a/../../b", "nul\x00byte", "", ".runwatch-tmp/x"])
def test_hostile_names_are_refused_at_the_call(stack_env, tmp_path, name):
    run = Experiment(Workspace.from_config(), unique_name("hostile")).start_logging()
    with pytest.raises(FileError, match="upload_file"):
        run.upload_file(name, io.BytesIO(b"x"))
    run.complete()


@pytest.mark.parametrize("raw", ["a/%2e%2e/%2e%2e/%2e%2e/escape.txt", "%2Fetc%2Fpasswd", "x%00y",
                                 ".runwatch-meta/forged.json"])
def test_hostile_names_are_refused_by_the_read_api(stack_env, tmp_path, raw):
    worker = stack_env
    r = httpx.put(f"{worker.api_url}/api/runs/hostile-run/files/{raw}", content=b"x", timeout=10)
    assert r.status_code in (400, 404), r.text
    root = worker.home / "files"
    outside = [p for p in root.parent.rglob("escape.txt")] + [p for p in root.rglob("forged.json")]
    assert outside == []


def test_a_cut_upload_leaves_nothing_visible(stack_env):
    worker = stack_env
    host, port = "127.0.0.1", worker.api_port
    run = Experiment(Workspace.from_config(), unique_name("cut")).start_logging()  # uploads go to runs that exist
    run.get_status()
    wait_until(lambda: httpx.get(f"{worker.api_url}/api/runs/{run.id}").status_code == 200, 30, what="run stored")
    tmp_dir = worker.home / "files" / "runs" / run.id / ".runwatch-tmp"
    with socket.create_connection((host, port)) as s:
        s.sendall(f"PUT /api/runs/{run.id}/files/outputs/partial.bin HTTP/1.1\r\nHost: {host}\r\n"
                  "Content-Length: 1000000\r\nContent-Type: application/octet-stream\r\n\r\n".encode())
        s.sendall(b"x" * 300_000)
        # the server is writing the partial body into a temporary file ...
        wait_until(lambda: tmp_dir.is_dir() and any(p.stat().st_size > 0 for p in tmp_dir.iterdir()), 10,
                   what="partial upload in progress")
    # ... and the connection is cut: nothing under that name, the temporary file gone
    wait_until(lambda: not any(tmp_dir.iterdir()), 10, what="temporary file removed")
    r = httpx.get(f"{worker.api_url}/api/runs/{run.id}/files/outputs/partial.bin", timeout=10)
    assert r.status_code == 404
    assert not (worker.home / "files" / "runs" / run.id / "outputs" / "partial.bin").exists()
    run.complete()

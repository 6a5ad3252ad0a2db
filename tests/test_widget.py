"""RunDetails: its synced state follows real runs through the real pipeline; its front end renders in
headless Chromium (a screenshot lands in test-output/ for a person to look at)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import textwrap
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT, unique_name, wait_until
from runwatch import Experiment, Run, RunDetails, ScriptRunConfig, Workspace
from runwatch.widget import MAX_POINTS, front_end

OUTPUT = ROOT / "test-output"


def _png() -> bytes:
    """A real image (a tanh curve), so the screenshot shows what a user would see."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig = plt.figure(figsize=(3, 2), dpi=60)
    x = np.linspace(-3, 3, 60)
    plt.plot(x, np.tanh(x))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


PNG = _png()


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium is missing: `./dev test` installs it"
    return path


@pytest.fixture
def live(stack_env, tmp_path):
    """A run with every kind of metric, an image and three trials, watched by a RunDetails while it runs."""
    exp = Experiment(Workspace.from_config(), unique_name("widget"))
    run = exp.start_logging(display_name="widget run", tags={"optimizer": "adam"},
                            properties={"learning_rate": "0.1"})
    png = tmp_path / "curve.png"
    png.write_bytes(PNG)
    for i in range(2000):
        run.log("loss", 50.0 if i == 1234 else 1.0 / (i + 1))
    run.log("optimizer", "adam")
    run.log_list("lr", [0.1, 0.05, 0.01])
    for fpr, tpr in ((0.0, 0.0), (0.2, 0.7), (1.0, 1.0)):
        run.log_row("roc", fpr=fpr, tpr=tpr)
    run.log_table("pr", {"recall": [0.9, 0.5], "precision": [0.6, 0.9]})
    run.log_image("curve", path=str(png))
    for name, auc in (("trial-0", 0.7), ("trial-1", 0.93), ("trial-2", 0.81)):
        with run.child_run(name=name) as child:
            child.log("auc", auc)
    details = RunDetails(run, refresh_interval=0.2, child_metric="auc", goal="max").start()
    yield run, details
    details.stop()


def metric(state, name):
    return next(m for m in state["metrics"] if m["name"] == name)


def test_state_follows_a_live_run_and_stops_refreshing_when_it_ends(live):
    run, details = live
    s = wait_until(lambda: (st := details.state).get("status") == "Running" and len(st.get("children", [])) == 3
                   and any(m["name"] == "curve" for m in st.get("metrics", [])) and st, 30, what="live state")
    assert details.polling and s["polling"]
    loss = wait_until(lambda: (m := metric(details.state, "loss"))["points"] == 2000 and m, 30, what="2000 points")
    assert len(loss["x"]) <= MAX_POINTS and max(loss["max"]) == 50.0, "the spike must survive the reduction"
    for i in range(2000, 3000):  # more points arrive while the widget watches
        run.log("loss", 0.0001)
    wait_until(lambda: metric(details.state, "loss")["points"] == 3000, 30, what="new points shown")
    run.complete()
    wait_until(lambda: not details.polling, 30, what="polling stopped at the terminal state")
    s = details.state
    assert s["status"] == "Completed" and s["terminal"] and not s["polling"] and s["elapsed_s"] > 0
    seen = details.refreshes
    time.sleep(1.0)
    assert details.refreshes == seen, "a finished run must not be polled"

    assert s["tags"] == {"optimizer": "adam"} and s["properties"] == {"learning_rate": "0.1"}
    assert metric(s, "optimizer")["value"] == "adam"
    assert metric(s, "lr")["max"] == [0.1, 0.05, 0.01] and metric(s, "lr")["kind"] == "list"
    roc = metric(s, "roc")
    assert (roc["kind"], roc["x_label"], roc["y_label"], roc["x"], roc["y"]) == ("row", "fpr", "tpr",
                                                                                   [0.0, 0.2, 1.0], [0.0, 0.7, 1.0])
    pr = metric(s, "pr")
    # a table is plotted as its first two columns in the order they were logged, sorted along x
    assert (pr["kind"], pr["x_label"], pr["y_label"]) == ("table", "recall", "precision")
    assert (pr["x"], pr["y"]) == ([0.5, 0.9], [0.9, 0.6])
    image = metric(s, "curve")
    assert image["kind"] == "image" and base64.b64decode(image["image"].split(",", 1)[1]) == PNG
    assert [c["name"] for c in s["children"]] == ["trial-0", "trial-1", "trial-2"]
    assert s["child_metric"] == "auc" and s["best_child"] == next(c["run_id"] for c in s["children"]
                                                                   if c["name"] == "trial-1")
    assert s["portal_url"] == run.get_portal_url()
    # the widget's synced trait is the same state
    assert details.widget().state == s


def test_a_submitted_runs_log_files_and_the_file_selector(stack_env, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.py").write_text(textwrap.dedent("""
        import os
        for i in range(3):
            print(f"rank {os.environ['RANK']} line {i}")
    """))
    run = Experiment(Workspace.from_config(), unique_name("widget-sub")).submit(
        ScriptRunConfig(source_directory=str(src), script="train.py", process_count_per_node=2))
    run.wait_for_completion(timeout=60)
    details = RunDetails(run, refresh_interval=0.2)
    s = wait_until(lambda: (st := details.refresh())["terminal"] and st["log_tail"]
                   and {f"azureml-logs/70_driver_log_{r}.txt" for r in (0, 1)} <= set(st["files"]) and st, 30,
                   what="both ranks' driver logs")
    assert "azureml-logs/70_driver_log_1.txt" in s["files"] and s["selected_file"] == "azureml-logs/70_driver_log_0.txt"
    assert s["log_tail"] == [f"rank 0 line {i}" for i in range(3)]
    widget = details.widget()
    widget.selected_file = "azureml-logs/70_driver_log_1.txt"  # what the front end's selector does
    wait_until(lambda: details.state["log_tail"] == [f"rank 1 line {i}" for i in range(3)], 30,
               what="tail of the chosen file")
    assert widget.state["selected_file"] == "azureml-logs/70_driver_log_1.txt"
    # a reopened run works the same
    again = RunDetails(Run(run.experiment, run.id)).refresh()
    assert again["status"] == "Completed" and again["files"] == s["files"]


def test_an_unreachable_stack_is_shown_and_retried_not_raised(tmp_path):
    ws = Workspace(settings=None, home=str(tmp_path), api_url="http://127.0.0.1:9", bootstrap_servers="127.0.0.1:9")
    run = Run(Experiment(ws, "nowhere"), "nowhere_1", _fetch=False)
    details = RunDetails(run, refresh_interval=0.1).start()
    try:
        wait_until(lambda: details.refreshes >= 3, 20, what="retries")
        assert details.polling and "not running" in details.state["stack_error"]
        assert "cannot be reached" in str(details)
    finally:
        details.stop()


def test_text_summary_outside_jupyter(live, capsys):
    run, details = live
    run.complete()
    wait_until(lambda: not details.polling, 30, what="done")
    RunDetails(run).show()  # no Jupyter kernel here: the text summary
    out = capsys.readouterr().out
    assert f"Run {run.id} (widget run)" in out and "status: Completed" in out
    assert "loss: 2000 values" in out and "roc: 3 rows of fpr and tpr" in out and "curve: image images/curve_0.png" in out
    assert "best by min auc" in out  # the default goal


def test_front_end_renders_in_headless_chromium(live, tmp_path):
    run, details = live
    run.complete()
    wait_until(lambda: not details.polling, 30, what="done")
    state = details.state
    esm, css = front_end()
    state_json = json.dumps(state).replace("</", "<\\/")  # JSON in a script element: no "</" may close it
    (tmp_path / "widget.js").write_text(esm)
    (tmp_path / "index.html").write_text(textwrap.dedent(f"""\
        <!doctype html><html><head><meta charset="utf-8"><style>{css}</style></head>
        <body style="width:960px"><div id="w"></div>
        <script id="state" type="application/json">{state_json}</script>
        <script type="module">
          import widget from "./widget.js";
          // the anywidget host's model interface, over the state Python synced
          const state = JSON.parse(document.getElementById("state").textContent);
          const model = {{ get: (k) => (k === "state" ? state : null), set() {{}}, save_changes() {{}},
                          on() {{}}, off() {{}} }};
          widget.render({{ model, el: document.getElementById("w") }});
          document.body.setAttribute("data-rendered", "yes");
        </script></body></html>"""))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--virtual-time-budget=5000", "--window-size=1000,1600"]
    try:
        dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True,
                             timeout=120).stdout
        OUTPUT.mkdir(exist_ok=True)
        shot = OUTPUT / "run-details.png"
        shot.unlink(missing_ok=True)
        subprocess.run([_chromium(), *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    finally:
        server.shutdown()
    assert 'data-rendered="yes"' in dom, dom[-2000:]
    charts = re.findall(r'class="rw-chart" data-metric="([^"]+)"', dom)
    (OUTPUT / "run-details.html").write_text(dom)
    assert sorted(charts) == sorted(m["name"] for m in state["metrics"])
    drawn = len(re.findall(r"<canvas", dom))
    assert drawn >= sum(1 for m in state["metrics"] if "x" in m), "each line chart is a uPlot canvas"
    assert 'data-status="Completed"' in dom and 'data-best="true"' in dom
    assert re.search(r'<img class="rw-image" src="data:image/png;base64,', dom)
    assert "trial-1" in dom and "open the run's page" in dom
    assert shot.exists() and shot.stat().st_size > 10_000, "no screenshot was written"

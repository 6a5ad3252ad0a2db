"""The Grafana studio: every panel's SQL and every alert query, expanded as the ClickHouse plugin expands it,
run on chDB filled by the real pipeline; generated files current; docker-compose.yml valid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import yaml

from conftest import ROOT, Worker, _unique, metric_series, unique_name, wait_until
from runwatch.dashboards import build, evaluate, provisioning
from runwatch.dashboards.macros import ALL, Variable, expand
from runwatch.dashboards.sdk import DATASOURCE_UID

NOW = datetime.now(timezone.utc)
RANGE = (NOW - timedelta(hours=1), NOW + timedelta(minutes=10))
N_LOSS = 20_000
SPIKE_AT = 12_345


@pytest.fixture(scope="module")
def filled(broker, tmp_path_factory):
    """Known runs sent through the real pipeline; then the worker stops and its chDB opens here, read-only."""
    from runwatch import Experiment, ScriptRunConfig, Workspace

    env = {"RUNWATCH_COMPUTE_TARGETS": "local=4,single=1", "RUNWATCH_HEARTBEAT_INTERVAL": "1"}
    w = Worker(broker, tmp_path_factory.mktemp("dash-worker"), _unique("d"), env).start()
    tmp = tmp_path_factory.mktemp("dash-sdk")
    saved = dict(os.environ)
    os.environ.update(RUNWATCH_HOME=str(tmp / "home"), RUNWATCH_BOOTSTRAP_SERVERS=broker.bootstrap,
                      RUNWATCH_TOPIC_PREFIX=w.prefix, RUNWATCH_BROKER_KIND="tansu", RUNWATCH_API_URL=w.api_url,
                      RUNWATCH_FLUSH_INTERVAL="0.05", **env)
    launchers = []
    try:
        ws = Workspace.from_config()
        exp_a, exp_b, exp_c = (Experiment(ws, unique_name(p)) for p in ("dash-a", "dash-b", "dash-c"))
        # the main run's system metrics (off elsewhere in the tests, tests/conftest.py): a few samples
        # (a workspace's settings are read when it is made: its own workspace, with them on)
        os.environ.update(RUNWATCH_SYSTEM_METRICS="true", RUNWATCH_SYSTEM_METRICS_INTERVAL="0.2")
        main = Experiment(Workspace.from_config(), exp_a.name).start_logging(display_name="main",
                                                                             tags={"optimizer": "adam"})
        os.environ["RUNWATCH_SYSTEM_METRICS"] = "false"
        del os.environ["RUNWATCH_SYSTEM_METRICS_INTERVAL"]
        for i in range(N_LOSS):
            main.log("loss", 100.0 if i == SPIKE_AT else 1.0 / (i + 1))
        for i in range(1000):
            main.log("accuracy", i / 1000)
        main.log("optimizer", "adam")
        main.log_list("lr", [0.1, 0.05, 0.01])
        for fpr, tpr in ((0.0, 0.0), (0.1, 0.6), (1.0, 1.0)):
            main.log_row("roc", fpr=fpr, tpr=tpr)
        main.log_table("pr", {"recall": [0.5, 0.9], "precision": [0.9, 0.6]})
        png = tmp / "curve.png"
        png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
        main.log_image("curve", path=str(png))
        trials = {"trial-0": [0.6] * 10, "trial-1": list(np.linspace(0.5, 0.95, 10)),
                  "trial-2": list(np.linspace(0.4, 0.8, 10))}
        for name, values in trials.items():
            with main.child_run(name=name) as child:
                for v in values:
                    child.log("auc", float(v))
        wait_until(lambda: len(metric_series(main, "system/process/rss_mb")) >= 3, 30, what="three system samples")
        main.complete()
        failed = exp_b.start_logging(display_name="diverged")
        failed.log("loss", 1.0)
        failed.fail(error_details="loss diverged")
        src = tmp / "src"
        src.mkdir()
        (src / "train.py").write_text(textwrap.dedent("""
            import os, sys
            rank = os.environ["RANK"]
            print(f"hello from rank {rank}")
            print(f"warn {rank}", file=sys.stderr)
        """))
        (src / "sleep.py").write_text("import time\ntime.sleep(600)\n")
        submitted = exp_a.submit(ScriptRunConfig(source_directory=str(src), script="train.py",
                                                 process_count_per_node=2))
        running = exp_c.submit(ScriptRunConfig(source_directory=str(src), script="sleep.py", compute_target="single"))
        launchers.append(running.launcher)
        wait_until(lambda: running.get_status() == "Running", 60, 0.1, what="sleeper Running")
        queued = exp_c.submit(ScriptRunConfig(source_directory=str(src), script="sleep.py", compute_target="single"))
        launchers.append(queued.launcher)
        assert submitted.wait_for_completion(timeout=90)["status"] == "Completed"

        def stored():
            runs = {r["run_id"]: r for r in w.get("/api/runs", include_children="true", limit=1000)}
            m = w.get("/api/runs", experiment=exp_a.name, metric="loss").__iter__()
            loss = {r["run_id"]: r.get("metrics", {}).get("loss", {}).get("count") for r in m}
            return (runs.get(main.id, {}).get("status") == "Completed" and loss.get(main.id) == N_LOSS
                    and runs.get(failed.id, {}).get("status") == "Failed"
                    and runs.get(queued.id, {}).get("status") == "Queued"
                    and sum(1 for r in runs.values() if r["parent_run_id"] == main.id
                            and r["status"] == "Completed") == 3
                    and w.get("/api/alerts", run_id=failed.id)
                    and len(w.get(f"/api/runs/{submitted.id}/logs",
                                  file="azureml-logs/70_driver_log_1.txt")["lines"]) == 2)
        wait_until(stored, 90, 0.25, what="every known run stored")
    finally:
        os.environ.clear()
        os.environ.update(saved)
        from runwatch.producers.emitter import close_all

        close_all(5)
        w.stop()
        for p in launchers:  # the ranks die with their launcher
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(10)
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=f"chdb://{w.home / 'chdb'}")
    known = dict(main=main.id, failed=failed.id, submitted=submitted.id, running=running.id, queued=queued.id,
                 exp_a=exp_a.name, exp_b=exp_b.name, exp_c=exp_c.name)
    children = {r[1]: r[0] for r in client.query(
        "SELECT run_id, display_name FROM runwatch.runs FINAL WHERE parent_run_id = {p:String}",
        parameters={"p": main.id}).result_rows}
    yield client, dict(known, children=children)


def run_sql(client, sql: str):
    """Run as Grafana's user would: readonly=1."""
    return client.query(sql, settings={"readonly": 1})


def resolve(client, model: dict, choices: dict) -> dict[str, Variable]:
    return evaluate.resolve(lambda sql: run_sql(client, sql), model, choices, RANGE)


def panel_results(client, model: dict, variables: dict[str, Variable]) -> dict[str, tuple]:
    """{panel title as Grafana shows it: (column names, rows, panel type, format)}; every target on
    the provisioned datasource."""
    for panel in model["panels"]:
        assert all(t["datasource"]["uid"] == DATASOURCE_UID for t in panel["targets"]), panel["title"]
    results = {}
    for title, sql, ptype, fmt in evaluate.panel_queries(model, variables, RANGE):
        res = run_sql(client, sql)
        results[title] = (list(res.column_names), res.result_rows, ptype, fmt)
    return results


def check_shapes(results: dict) -> None:
    """What each kind of panel needs from its query."""
    for title, (cols, rows, ptype, fmt) in results.items():
        if not rows:
            continue  # chDB gives no header for an empty result; each test asserts the rows it expects
        if fmt == 0:
            assert cols[0] == "time", f"{title}: a time series starts with its time column, not {cols}"
        if fmt == 2:
            assert {"timestamp", "body", "level"} <= set(cols), f"{title}: a logs panel needs timestamp/body/level"
        if ptype == "trend":
            assert {"step_start", "min", "max"} <= set(cols), title
        if ptype == "xychart":
            assert {"x", "y"} <= set(cols), title


def test_dashboards_and_provisioning_are_current():
    for rel, content in provisioning.files().items():
        path = ROOT / "dashboards" / rel
        assert path.exists() and path.read_text() == content, (
            f"dashboards/{rel} is stale: run `python -m runwatch.dashboards.provisioning`")


def test_experiments_dashboard(filled):
    client, k = filled
    model = build.build_all()["runwatch-experiments.json"]
    res = panel_results(client, model, resolve(client, model, {}))
    check_shapes(res)
    exps = {r[0]: r for r in res["Experiments"][1]}
    cols = res["Experiments"][0]
    a, b = dict(zip(cols, exps[k["exp_a"]])), dict(zip(cols, exps[k["exp_b"]]))
    assert (a["runs"], a["completed"], a["failed"]) == (2, 2, 0)
    assert (b["runs"], b["failed"]) == (1, 1)
    assert res["Runs started"][1], "no runs per time bucket"
    only_a = panel_results(client, model, resolve(client, model, {"experiment": [k["exp_a"]]}))
    assert [r[0] for r in only_a["Experiments"][1]] == [k["exp_a"]]
    assert {r[0] for r in only_a["Runs by status"][1]} == {k["exp_a"]}


def test_all_runs_dashboard_with_metric_columns_and_filters(filled):
    client, k = filled
    model = build.build_all()["runwatch-runs.json"]
    choices = {"metric_a": "loss", "metric_b": "accuracy"}
    res = panel_results(client, model, resolve(client, model, choices))
    check_shapes(res)
    cols, rows, _, _ = res["Runs"]
    main = dict(zip(cols, next(r for r in rows if r[0] == k["main"])))
    assert main["loss min"] == pytest.approx(1 / N_LOSS) and main["loss max"] == 100.0
    assert main["loss last"] == pytest.approx(1 / N_LOSS) and main["accuracy last"] == pytest.approx(0.999)
    assert main["status"] == "Completed" and json.loads(main["tags"]) == {"optimizer": "adam"}
    assert main["duration_s"] > 0
    filtered = panel_results(client, model, resolve(client, model, dict(
        choices, tag="optimizer=adam", status=["Completed"])))
    assert [r[0] for r in filtered["Runs"][1]] == [k["main"]]
    by_target = panel_results(client, model, resolve(client, model, dict(choices, compute_target=["single"])))
    assert {r[0] for r in by_target["Runs"][1]} == {k["running"], k["queued"]}


def test_run_dashboard_metrics_images_children_files(filled):
    client, k = filled
    model = build.build_all()["runwatch-run.json"]
    variables = resolve(client, model, {"run_id": k["main"]})
    assert set(variables["metric"].options) == {"loss", "accuracy", "lr"}
    assert set(variables["table_metric"].options) == {"roc", "pr"}
    assert {"system/process/rss_mb", "system/node/cpu_percent"} <= set(variables["system_metric"].options)
    assert all(o.startswith("system/") for o in variables["system_metric"].options)
    res = panel_results(client, model, variables)
    check_shapes(res)
    rss = res["system/process/rss_mb"]
    assert len(rss[1]) >= 3 and all(10 < dict(zip(rss[0], r))["system/process/rss_mb"] < 64_000 for r in rss[1])
    cols, rows, _, _ = res["loss"]
    assert len(rows) <= build.MAX_POINTS + 1, "a chart must never get every point of a long series"
    got = [dict(zip(cols, r)) for r in rows]
    assert max(g["max"] for g in got) == 100.0, "the spike did not survive the bucketing"
    assert min(g["min"] for g in got) == pytest.approx(1 / N_LOSS)
    assert [dict(zip(res["lr"][0], r))["max"] for r in res["lr"][1]] == [0.1, 0.05, 0.01]
    roc = [dict(zip(res["roc"][0], r)) for r in res["roc"][1]]
    assert [(r["x"], r["y"]) for r in roc] == [(0.0, 0.0), (0.1, 0.6), (1.0, 1.0)]
    assert roc[0]["x_column"] == "fpr" and roc[0]["y_column"] == "tpr"
    run_row = dict(zip(res["Run"][0], res["Run"][1][0]))
    assert run_row["status"] == "Completed" and run_row["name"] == "main"
    assert sorted(r[1] for r in res["Child runs"][1]) == ["trial-0", "trial-1", "trial-2"]
    images = [dict(zip(res["Images"][0], r)) for r in res["Images"][1]]
    assert images == [{"name": "curve", "step": 0, "file": "images/curve_0.png",
                       "image": f"http://127.0.0.1:8765/api/runs/{k['main']}/files/images/curve_0.png"}]
    assert [r[0] for r in res["Files"][1]] == ["images/curve_0.png"]
    assert [r[2] for r in res["Status history"][1]] == ["Running", "Completed"]


def test_run_dashboard_logs_of_a_submitted_run(filled):
    client, k = filled
    model = build.build_all()["runwatch-run.json"]
    variables = resolve(client, model, {"run_id": k["submitted"], "log_file": "azureml-logs/70_driver_log_1.txt"})
    assert "azureml-logs/70_driver_log_0.txt" in variables["log_file"].options
    res = panel_results(client, model, variables)
    check_shapes(res)
    cols, rows, _, _ = res["azureml-logs/70_driver_log_1.txt"]
    lines = sorted((dict(zip(cols, r)) for r in rows), key=lambda r: r["seq"])
    assert [(ln["body"], ln["level"], ln["rank"]) for ln in lines] == [
        ("hello from rank 1", "info", 1), ("warn 1", "error", 1)]
    files = {r[0] for r in res["Files"][1]}
    assert {"azureml-logs/70_driver_log_0.txt", "azureml-logs/process_info.json"} <= files


def test_compare_dashboard(filled):
    client, k = filled
    model = build.build_all()["runwatch-compare.json"]
    variables = resolve(client, model, {"runs": [k["main"], k["failed"]], "metric": "loss"})
    res = panel_results(client, model, variables)
    check_shapes(res)
    by_step = [dict(zip(res["loss by step"][0], r)) for r in res["loss by step"][1]]
    assert {r["run_id"] for r in by_step} == {k["main"], k["failed"]}
    assert sum(1 for r in by_step if r["run_id"] == k["main"]) <= build.MAX_POINTS + 1
    over_time = [dict(zip(res["loss over time"][0], r)) for r in res["loss over time"][1]]
    assert {r["run_id"] for r in over_time} == {k["main"], k["failed"]}
    aggs = {r[0]: dict(zip(res["Aggregates of loss"][0], r)) for r in res["Aggregates of loss"][1]}
    assert aggs[k["main"]]["max"] == 100.0 and aggs[k["failed"]]["last"] == 1.0


def test_compute_dashboard(filled):
    client, k = filled
    model = build.build_all()["runwatch-compute.json"]
    res = panel_results(client, model, resolve(client, model, {}))
    check_shapes(res)
    queue = [dict(zip(res["Queue"][0], r)) for r in res["Queue"][1]]
    single = [(q["run_id"], q["status"], q["processes"]) for q in queue if q["compute_target"] == "single"]
    assert single == [(k["running"], "Running", 1), (k["queued"], "Queued", 1)]
    bars = {r[0]: dict(zip(res["Queued and running per compute target"][0], r))
            for r in res["Queued and running per compute target"][1]}
    assert (bars["single"]["queued"], bars["single"]["running"], bars["single"]["slots_in_use"]) == (1, 1, 1)


@pytest.mark.parametrize("goal, best", [("max", "trial-1"), ("min", "trial-2")])
def test_parent_dashboard_finds_the_best_child(filled, goal, best):
    client, k = filled
    model = build.build_all()["runwatch-parent.json"]
    res = panel_results(client, model, resolve(client, model, {"parent_run_id": k["main"], "metric": "auc",
                                                               "goal": goal}))
    check_shapes(res)
    title = "Best child by auc (%s)" % goal
    best_row = dict(zip(res[title][0], res[title][1][0]))
    assert best_row["best_child"] == k["children"][best]
    table = [dict(zip(res["Children by auc"][0], r)) for r in res["Children by auc"][1]]
    assert table[0]["run_id"] == k["children"][best] and len(table) == 3
    assert len(res["Children's last auc"][1]) == 3
    assert {r[res["Children's auc by step"][0].index("run_id")] for r in res["Children's auc by step"][1]} == set(
        k["children"].values())


def test_alert_rule_queries(filled):
    client, k = filled
    for uid, _, status in provisioning.ALERT_RULES:
        rule = next(r for r in provisioning.alert_rules() if r["uid"] == uid)
        sql = expand(rule["data"][0]["model"]["rawSql"], {}, *RANGE)
        res = run_sql(client, sql)
        runs = {r[0] for r in res.result_rows}
        if runs:  # chDB gives no header for an empty result
            assert res.column_names == ("run_id", "experiment", "alerts")
        assert runs == ({k["failed"]} if status == "Failed" else set())


def test_grafanas_user_cannot_write(filled):
    client, _ = filled
    with pytest.raises(Exception, match="(?i)readonly"):
        client.command("INSERT INTO runwatch.alerts (run_id) VALUES ('forged')", settings={"readonly": 1})


def test_macros_expand_as_the_plugin_expands_them():
    t0, t1 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), datetime(2026, 1, 2, 4, 4, 5, tzinfo=timezone.utc)
    v = {"exp": Variable(["a", "b"], ["a", "b", "c"]), "one": Variable("x"), "all": Variable(ALL, ["p", "q"])}
    sql = ("SELECT $__timeInterval(ts) AS time FROM t WHERE $__timeFilter(ts) AND $__conditionalAll(e IN (${exp}), $exp)"
           " AND $__conditionalAll(f IN (${all}), $all) AND g = '$one' AND h IN ($all) AND $__interval_s > 0 "
           "AND $__fromTime < $__toTime AND $__timeFilter_ms(ts)")
    assert expand(sql, v, t0, t1, interval_s=7.9) == (
        "SELECT toStartOfInterval(toDateTime(ts), INTERVAL 7 second) AS time FROM t "
        "WHERE ts >= toDateTime(1767323045) AND ts <= toDateTime(1767326645) AND e IN ('a','b') AND 1=1 "
        "AND g = 'x' AND h IN ('p','q') AND 7 > 0 AND toDateTime(1767323045) < toDateTime(1767326645) "
        "AND ts >= fromUnixTimestamp64Milli(1767323045000) AND ts <= fromUnixTimestamp64Milli(1767326645000)")


def test_compose_file_and_provisioning_are_valid(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNWATCH_", "CLICKHOUSE_", "GRAFANA_"))}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    out = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert set(config["services"]) == {"kafka-1", "kafka-2", "kafka-3", "clickhouse", "grafana", "worker"}
    worker = config["services"]["worker"]["environment"]
    assert worker["RUNWATCH_REPLICATION_FACTOR"] == "3" and worker["RUNWATCH_API_TOKEN"] == env["RUNWATCH_API_TOKEN"]
    for mount in config["services"]["grafana"]["volumes"]:
        src = mount["source"] if isinstance(mount, dict) else mount.split(":")[0]
        if src.startswith("/"):
            assert os.path.exists(src), f"Grafana mounts {src}, which is not in the repository"
    assert (ROOT / "Dockerfile").exists()
    missing = dict(env)
    del missing["CLICKHOUSE_PASSWORD"]
    bad = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                         text=True, env=missing, cwd=ROOT, timeout=60)
    assert bad.returncode != 0 and "set CLICKHOUSE_PASSWORD" in bad.stderr
    ds = yaml.safe_load((ROOT / "dashboards/provisioning/datasources/runwatch-clickhouse.yaml").read_text())
    assert ds["datasources"][0]["uid"] == DATASOURCE_UID
    alerting = yaml.safe_load((ROOT / "dashboards/provisioning/alerting/runwatch-alerts.yaml").read_text())
    assert [r["uid"] for r in alerting["groups"][0]["rules"]] == [u for u, _, _ in provisioning.ALERT_RULES]
    assert alerting["contactPoints"][0]["receivers"][0]["settings"]["url"] == "$RUNWATCH_ALERT_WEBHOOK_URL"


def test_export_cli_is_idempotent(tmp_path):
    from typer.testing import CliRunner

    from runwatch.cli import app

    first = CliRunner().invoke(app, ["dashboards", "export", str(tmp_path)])
    assert first.exit_code == 0 and "9 written" in " ".join(first.stdout.split())
    again = CliRunner().invoke(app, ["dashboards", "export", str(tmp_path)])
    assert again.exit_code == 0 and "0 written, 9 already current" in " ".join(again.stdout.split())
    assert json.loads((tmp_path / "generated/runwatch-run.json").read_text())["uid"] == "runwatch-run"

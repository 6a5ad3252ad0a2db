"""`runwatch dashboards export DIR`: the dashboards and Grafana's provisioning files as the package ships them.

They are built from code (dashboards/build.py, dashboards/provisioning.py, with the stack extra's Grafana
SDK) into `generated/` and `provisioning/` here, which the tests keep current; exporting only copies them,
so a light install (`pip install runwatch`) can export too.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

#: What is shipped: {relative path: package directory}.
SHIPPED = ("generated", "provisioning/datasources", "provisioning/dashboards", "provisioning/alerting")


def shipped(api_url: str | None = None) -> dict[str, str]:
    """{relative path: content}: every shipped file, the Run dashboard's image address set to `api_url`."""
    root = resources.files("runwatch.dashboards")
    out: dict[str, str] = {}
    for folder in SHIPPED:
        d = root.joinpath(*folder.split("/"))
        for entry in sorted(d.iterdir(), key=lambda e: e.name):
            if entry.name.endswith((".json", ".yaml")):
                out[f"{folder}/{entry.name}"] = entry.read_text()
    if api_url:
        for rel, text in out.items():
            if rel.startswith("generated/"):
                out[rel] = with_api_url(text, api_url)
    return out


def with_api_url(text: str, api_url: str) -> str:
    model = json.loads(text)
    for v in model.get("templating", {}).get("list", []):
        if v.get("name") == "api_url":
            v["query"] = api_url
            v["current"] = {"text": api_url, "value": api_url}
    return json.dumps(model, indent=2, sort_keys=True) + "\n"


def write(directory: Path, api_url: str | None = None) -> tuple[int, list[Path]]:
    """Write what is shipped under `directory`; unchanged files are left alone. (files in all, written)"""
    files = shipped(api_url)
    return len(files), write_changed(directory, files)


def write_changed(directory: Path, files: dict[str, str]) -> list[Path]:
    """{relative path: content} under `directory`, each file only where it differs; the paths written."""
    written = []
    for rel, content in files.items():
        p = Path(directory) / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists() or p.read_text() != content:
            p.write_text(content)
            written.append(p)
    return written

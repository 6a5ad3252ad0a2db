"""Grafana provisioning: the ClickHouse datasource, the dashboards provider, alert rules and their webhook.

`files()` builds what the package ships and docker-compose mounts (`dashboards/provisioning/` and
`dashboards/generated/` in the repository, kept current by the tests; `runwatch dashboards export DIR`
copies them: dashboards/export.py). `push()` sends the same dashboards and alert rules to a running Grafana with
grafana-client; both are idempotent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .build import DB, build_all, url
from .push import CONTACT_POINT, FOLDER_UID, RULE_GROUP
from .sdk import DATASOURCE_UID, PLUGIN

#: (uid, title, status the rule watches). Each rule fires once per run that entered the status
#: in the last 5 minutes; the run and its experiment become the alert's labels.
ALERT_RULES = [
    ("runwatch-run-failed", "A run failed", "Failed"),
    ("runwatch-run-not-responding", "A run is not responding", "NotResponding"),
]


def alert_sql(status: str) -> str:
    return (f"SELECT run_id, experiment, count() AS alerts FROM {DB}.alerts FINAL "
            f"WHERE status = '{status}' AND ts >= now64(6) - INTERVAL 5 MINUTE GROUP BY run_id, experiment")


def alert_rules() -> list[dict[str, Any]]:
    rules = []
    for uid, title, status in ALERT_RULES:
        rules.append({
            "uid": uid, "title": title, "condition": "B", "for": "0s",
            "noDataState": "OK", "execErrState": "Error",
            "annotations": {"summary": f"{{{{ $labels.run_id }}}} ({{{{ $labels.experiment }}}}) is {status}",
                            "runbook_url": url("run") + "?var-run_id={{ $labels.run_id }}"},
            "labels": {"source": "runwatch", "status": status},
            "data": [
                {"refId": "A", "relativeTimeRange": {"from": 600, "to": 0}, "datasourceUid": DATASOURCE_UID,
                 "model": {"refId": "A", "datasource": {"type": PLUGIN, "uid": DATASOURCE_UID},
                           "editorType": "sql", "queryType": "table", "format": 1, "rawSql": alert_sql(status)}},
                {"refId": "B", "datasourceUid": "__expr__",
                 "model": {"refId": "B", "type": "threshold", "expression": "A",
                           "datasource": {"type": "__expr__", "uid": "__expr__"},
                           "conditions": [{"evaluator": {"type": "gt", "params": [0]}}]}},
            ],
        })
    return rules


def alerting() -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "groups": [{"orgId": 1, "name": RULE_GROUP, "folder": "runwatch", "interval": "30s",
                    "rules": alert_rules()}],
        "contactPoints": [{"orgId": 1, "name": CONTACT_POINT, "receivers": [{
            "uid": CONTACT_POINT, "type": "webhook", "disableResolveMessage": True,
            # Grafana expands $VARIABLES in provisioning files from its environment
            "settings": {"url": "$RUNWATCH_ALERT_WEBHOOK_URL", "httpMethod": "POST"}}]}],
        "policies": [{"orgId": 1, "receiver": CONTACT_POINT, "group_by": ["alertname", "run_id"],
                      "group_wait": "0s", "group_interval": "1m", "repeat_interval": "4h"}],
    }


def datasources() -> dict[str, Any]:
    return {"apiVersion": 1, "datasources": [{
        "name": "runwatch ClickHouse", "uid": DATASOURCE_UID, "type": PLUGIN, "editable": False,
        "jsonData": {"host": "$CLICKHOUSE_HOST", "port": 9000, "protocol": "native",
                     "username": "$CLICKHOUSE_GRAFANA_USER", "defaultDatabase": DB, "secure": False},
        "secureJsonData": {"password": "$CLICKHOUSE_GRAFANA_PASSWORD"},
    }]}


def dashboard_provider(path: str = "/var/lib/grafana/dashboards/runwatch") -> dict[str, Any]:
    return {"apiVersion": 1, "providers": [{
        "name": "runwatch", "orgId": 1, "folder": "runwatch", "folderUid": FOLDER_UID, "type": "file",
        "disableDeletion": True, "allowUiUpdates": False, "updateIntervalSeconds": 30,
        "options": {"path": path, "foldersFromFilesStructure": False}}]}


def files(api_url: str | None = None) -> dict[str, str]:
    """{relative path: content} of everything the package ships (dashboards/export.py)."""
    dump = lambda d: yaml.safe_dump(d, sort_keys=False, width=120)  # noqa: E731
    out = {f"generated/{name}": json.dumps(model, indent=2, sort_keys=True) + "\n"
           for name, model in build_all(api_url).items()}
    out["provisioning/datasources/runwatch-clickhouse.yaml"] = dump(datasources())
    out["provisioning/dashboards/runwatch.yaml"] = dump(dashboard_provider())
    out["provisioning/alerting/runwatch-alerts.yaml"] = dump(alerting())
    return out


def regenerate(root: Path | None = None) -> list[str]:
    """Write the built files under dashboards/ of the source tree where they changed; the paths written."""
    from .export import write_changed

    root = root or Path(__file__).resolve().parent
    return [str(p.relative_to(root)) for p in write_changed(root, files())]


if __name__ == "__main__":  # python -m runwatch.dashboards.provisioning: after a change to build.py or this file
    print("\n".join(f"wrote dashboards/{rel}" for rel in regenerate()) or "dashboards/ is current")

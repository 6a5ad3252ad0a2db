"""`runwatch dashboards push`: the shipped dashboards and alert rules into a running Grafana, with grafana-client
(the stack extra); safe to repeat."""

from __future__ import annotations

import json
from typing import Any

from runwatch.core.errors import require

from .export import shipped

FOLDER_UID = "runwatch"
RULE_GROUP = "runwatch-runs"
CONTACT_POINT = "runwatch-webhook"


def alert_rules() -> list[dict[str, Any]]:
    """The alert rules as shipped in provisioning/alerting/runwatch-alerts.yaml."""
    yaml = require("yaml", "`runwatch dashboards push`")
    return yaml.safe_load(shipped()["provisioning/alerting/runwatch-alerts.yaml"])["groups"][0]["rules"]


def push(grafana_url: str, token: str | None = None, api_url: str | None = None,
         webhook_url: str | None = None) -> dict[str, int]:
    """Create or update the folder, the dashboards, the alert rules and (given a URL) the webhook."""
    GrafanaApi = require("grafana_client", "`runwatch dashboards push`").GrafanaApi
    from grafana_client.client import GrafanaClientError

    api = GrafanaApi.from_url(grafana_url, credential=token) if token else GrafanaApi.from_url(grafana_url)
    try:
        api.folder.get_folder(FOLDER_UID)
    except GrafanaClientError:
        api.folder.create_folder("runwatch", uid=FOLDER_UID)
    n = 0
    for rel, text in shipped(api_url).items():
        if not rel.startswith("generated/"):
            continue
        model = json.loads(text)
        api.dashboard.update_dashboard({"dashboard": model, "folderUid": FOLDER_UID, "overwrite": True,
                                        "message": "runwatch dashboards push"})
        n += 1
    existing = {r["uid"] for r in api.alertingprovisioning.get_alertrules_all()}
    rules = alert_rules()
    for rule in rules:
        body = dict(rule, folderUID=FOLDER_UID, ruleGroup=RULE_GROUP, orgID=1)
        if rule["uid"] in existing:
            api.alertingprovisioning.update_alertrule(rule["uid"], body)
        else:
            api.alertingprovisioning.create_alertrule(body)
    if webhook_url:
        cp = {"uid": CONTACT_POINT, "name": CONTACT_POINT, "type": "webhook",
              "settings": {"url": webhook_url, "httpMethod": "POST"}, "disableResolveMessage": True}
        if any(c.get("uid") == CONTACT_POINT for c in api.alertingprovisioning.get_contactpoints()):
            api.alertingprovisioning.update_contactpoint(CONTACT_POINT, cp)
        else:
            api.alertingprovisioning.create_contactpoint(cp)
    return {"dashboards": n, "alert_rules": len(rules)}

"""Grafana dashboards as code, provisioning and alert rules (arrives with the "Studio on Grafana" issue)."""

__all__: list[str] = []

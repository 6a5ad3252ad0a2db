"""The alert webhook: every alert event is POSTed as JSON to `alert_webhook_url`, with retries."""

from __future__ import annotations

import logging
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from runwatch.core.events import Alert, Envelope
from runwatch.core.settings import Settings

log = logging.getLogger("runwatch.alerts")


class WebhookError(Exception):
    """The webhook answered with a status that may succeed on a retry (5xx, 429)."""


def alert_body(env: Envelope, settings: Settings) -> dict[str, Any]:
    """The JSON a webhook receives; `alert_id` is stable across redeliveries (use it to deduplicate)."""
    p: Alert = env.payload
    body = {"alert_id": env.event_id, "run_id": env.run_id, "experiment": env.experiment, "status": p.status.value,
            "reason": p.reason, "ts": env.ts, "details": p.details}
    body["portal_url"] = settings.portal_url(env.run_id)
    return body


class Webhook:
    """Delivers alerts at least once: a redelivered event (a worker restart) may POST the same alert_id again."""

    def __init__(self, settings: Settings):
        self.url = settings.alert_webhook_url
        self.attempts = max(1, settings.alert_webhook_attempts)
        self.settings = settings
        self.delivered = 0
        self.failed = 0
        self._client: httpx.AsyncClient | None = None

    async def deliver(self, env: Envelope) -> bool:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=10.0)
        body = alert_body(env, self.settings)
        try:
            async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self.attempts), wait=wait_exponential(multiplier=0.5, max=10),
                    retry=retry_if_exception_type((httpx.TransportError, WebhookError)), reraise=True):
                with attempt:
                    r = await self._client.post(self.url, json=body, headers={"X-Runwatch-Alert-Id": env.event_id})
                    if r.status_code >= 500 or r.status_code == 429:
                        raise WebhookError(f"HTTP {r.status_code}")
                    if r.status_code >= 400:
                        raise ValueError(f"the webhook refused the alert: HTTP {r.status_code} {r.text[:200]}")
        except Exception as exc:  # counted and logged; the alert itself is stored in ClickHouse regardless
            self.failed += 1
            log.error("runwatch: alert %s for run %s not delivered to the webhook after %d attempt(s): %s",
                      env.event_id, env.run_id, self.attempts, exc)
            return False
        self.delivered += 1
        return True

"""The Faust app: agents on `metrics` and `runs` that keep per-run tables and write `aggregates`, `alerts`, `dlq`."""

from __future__ import annotations

import logging
import re
from typing import Any

import faust

from runwatch.events import DeadLetter, Envelope, EventError, decode, encode, make_envelope
from runwatch.settings import Settings

from .logic import MetricsLogic, RunStateLogic, derived_id

log = logging.getLogger("runwatch.processors")


class Processors:
    """Builds the Faust app for one settings object; `ready` turns true after the first rebalance."""

    def __init__(self, settings: Settings, bootstrap: str):
        self.settings = settings
        self.ready = False
        self.events = 0
        self.dead_letters = 0
        self.errors = 0
        app_id = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{settings.topic_prefix}processors")
        self.app = app = faust.App(
            app_id,
            broker=f"kafka://{bootstrap}",
            store="memory://",
            topic_partitions=settings.partitions,
            topic_replication_factor=1,
            # DESIGN.md: Faust's defaults delay the first group join by ~30 s on the embedded broker
            broker_rebalance_timeout=3.0,
            broker_session_timeout=6.0,
            broker_heartbeat_interval=1.0,
            broker_commit_interval=1.0,
            producer_acks=-1,
            producer_linger_ms=5,
            producer_compression_type="lz4",
            consumer_auto_offset_reset="earliest",
            web_enabled=False,
            stream_wait_empty=False,
            table_standby_replicas=0,
            datadir=str(settings.home / "processors"),
        )
        raw = dict(key_serializer="raw", value_serializer="raw")
        self.metrics_topic = app.topic(settings.topic("metrics"), **raw)
        self.runs_topic = app.topic(settings.topic("runs"), **raw)
        self.out = {name: app.topic(settings.topic(name), **raw) for name in ("aggregates", "alerts", "dlq")}
        self.metric_state = app.Table("metric_state", default=None, partitions=settings.partitions)
        self.run_state = app.Table("run_state", default=None, partitions=settings.partitions)
        self.metrics_logic = MetricsLogic()
        self.run_logic = RunStateLogic()

        @app.agent(self.metrics_topic, name="metrics")
        async def metrics_agent(stream):
            async for event in stream.events():
                await self._guarded(event, self._on_metrics)

        @app.agent(self.runs_topic, name="runs")
        async def runs_agent(stream):
            async for event in stream.events():
                await self._guarded(event, self._on_run_event)

        @app.on_rebalance_complete.connect
        async def on_ready(sender: Any, **kwargs: Any) -> None:
            self.ready = True

    async def _guarded(self, event, handler) -> None:
        """Decode and handle one event; anything it cannot take goes to the dlq, never crashes the agent."""
        msg = event.message
        try:
            env = decode(msg.value)
        except EventError as exc:
            await self._dead_letter(str(exc), msg)
            return
        try:
            await handler(env)
            self.events += 1
        except Exception as exc:  # Faust acks the event anyway: record it instead of losing it silently
            self.errors += 1
            log.exception("runwatch processors: handling %s failed", env.event_id)
            await self._dead_letter(f"processing failed: {type(exc).__name__}: {exc}", msg, env)

    async def _dead_letter(self, reason: str, msg, env: Envelope | None = None) -> None:
        self.dead_letters += 1
        key = msg.key or b""
        run_id = env.run_id if env else (key.decode("utf-8", "replace")[:256] or "unknown")
        payload = DeadLetter(reason=reason, topic=msg.topic, partition=msg.partition, offset=msg.offset,
                             raw=bytes(msg.value or b"")[:4096])
        out = make_envelope(run_id, env.experiment if env else "", payload, msg.offset,
                            event_id=derived_id("dlq", msg.topic, str(msg.partition), str(msg.offset)))
        await self.out["dlq"].send(key=run_id.encode(), value=encode(out))

    async def _emit(self, outputs) -> None:
        for topic, run_id, env in outputs:
            await self.out[topic].send(key=run_id.encode(), value=encode(env))

    async def _on_metrics(self, env: Envelope) -> None:
        state = self.metric_state.get(env.run_id) or MetricsLogic.new_state()
        outputs = self.metrics_logic.handle(env, state)
        if outputs:
            self.metric_state[env.run_id] = state
            await self._emit(outputs)

    async def _on_run_event(self, env: Envelope) -> None:
        state = self.run_state.get(env.run_id) or RunStateLogic.new_state(env.run_id, env.experiment)
        outputs = self.run_logic.handle(env, state)
        self.run_state[env.run_id] = state
        await self._emit(outputs)

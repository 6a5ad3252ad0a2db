"""The Faust app: agents on `metrics`, `runs` and `logs` that keep per-run tables and write `aggregates`,
`alerts`, `dlq`; a timer that finds runs whose heartbeats stopped; the alert webhook."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from typing import Any

import faust

from runwatch.core.events import (
    Alert,
    DeadLetter,
    Envelope,
    EventError,
    LogBatch,
    RunState,
    decode,
    encode,
    make_envelope,
)
from runwatch.core.settings import Settings

from .logic import MetricsLogic, Rejected, RunStateLogic, derived_id, update_tails

#: Run states waiting to go out: sent STATES_WITHIN seconds after the first of them, or once there are
#: STATES_BATCH of them.
STATES_BATCH = 500
STATES_WITHIN = 0.02
from .notify import Webhook

log = logging.getLogger("runwatch.processors")


def _credentials(settings: Settings):
    """Faust's form of the Kafka security settings (the same ones the producers and the sink use)."""
    args = settings.kafka_args()
    proto = args["security_protocol"]
    if proto.startswith("SASL"):
        return faust.SASLCredentials(username=args["sasl_plain_username"], password=args["sasl_plain_password"],
                                     mechanism=args["sasl_mechanism"], ssl_context=args.get("ssl_context"))
    if proto == "SSL":
        return faust.SSLCredentials(args["ssl_context"])
    return None


def _transport(settings: Settings, app: faust.App):
    """Faust's Kafka transport with the consumer's fetch wait from the settings: Faust's worker consumer waits
    1,500 ms for data, and the embedded broker holds each fetch that long even when data comes sooner, which
    made every event wait 0.75 s on average for the processors (docs/architecture.md)."""
    from faust.transport.drivers import aiokafka as driver

    wait = settings.fetch_max_wait_ms

    class ConsumerThread(driver.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport):
            consumer = super()._create_worker_consumer(transport)
            consumer._fetch_max_wait_ms = wait  # read when the consumer starts
            return consumer

    class Consumer(driver.Consumer):
        def _new_consumer_thread(self):
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class Transport(driver.Transport):
        pass

    Transport.Consumer = Consumer
    return Transport(app.conf.broker_consumer, app)


class Processors:
    """Builds the Faust app for one settings object; `ready` turns true after the first rebalance."""

    def __init__(self, settings: Settings, bootstrap: str, stored=None):
        """`stored` (sinks/state.py's StoredState, given by the worker): where a run's state is reloaded from
        when the tables do not have it; None: every run unknown to the tables starts anew."""
        self.settings = settings
        self.stored = stored
        self.reloaded = 0
        self.max_output = settings.processor_max_message_bytes
        self.ready = False
        self.events = 0
        self.dead_letters = 0
        self.errors = 0
        app_id = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{settings.topic_prefix}processors")
        self.app = app = faust.App(
            app_id,
            broker=f"kafka://{bootstrap}",
            broker_credentials=_credentials(settings),
            store="memory://",
            topic_partitions=settings.partitions,
            topic_replication_factor=settings.replication_factor,
            # docs/architecture.md, Dependencies: Faust's defaults delay the first group join by ~30 s on the embedded broker
            broker_rebalance_timeout=3.0,
            broker_session_timeout=6.0,
            broker_heartbeat_interval=1.0,
            broker_commit_interval=1.0,
            producer_acks=-1,
            producer_linger_ms=5,
            producer_compression_type="zstd",
            producer_max_request_size=settings.max_request_size,  # as the SDK's (runwatch/core/settings.py)
            consumer_auto_offset_reset="earliest",
            web_enabled=False,
            stream_wait_empty=False,
            table_standby_replicas=0,
            datadir=str(settings.home / "processors"),
        )
        app.transport = _transport(settings, app)
        raw = dict(key_serializer="raw", value_serializer="raw")
        self.metrics_topic = app.topic(settings.topic("metrics"), **raw)
        self.runs_topic = app.topic(settings.topic("runs"), **raw)
        self.logs_topic = app.topic(settings.topic("logs"), **raw)
        self.alerts_topic = app.topic(settings.topic("alerts"), **raw)
        self.out = {name: app.topic(settings.topic(name), **raw) for name in ("aggregates", "alerts", "dlq", "runs")}
        self.metric_state = app.Table("metric_state", default=None, partitions=settings.partitions)
        self.run_state = app.Table("run_state", default=None, partitions=settings.partitions)
        self.log_tail = app.Table("log_tail", default=None, partitions=settings.partitions)
        self.metrics_logic = MetricsLogic(settings.max_metric_names)
        self.run_logic = RunStateLogic()
        self.started = time.time()
        self.liveness_checks = 0
        self._check_seqs: dict[str, itertools.count] = {}  # run_id -> this worker's next check seq for it
        self._checked: dict[str, tuple] = {}  # run_id -> (status, last_seen) a check was written for
        self.webhook = Webhook(settings) if settings.alert_webhook_url else None
        self._states: dict[str, Any] = {}  # run_id -> its newest state output, not sent yet
        self._states_task: asyncio.Future | None = None

        @app.agent(self.metrics_topic, name="metrics")
        async def metrics_agent(stream):
            async for event in stream.events():
                await self._guarded(event, self._on_metrics)

        @app.agent(self.runs_topic, name="runs")
        async def runs_agent(stream):
            async for event in stream.events():
                await self._guarded(event, self._on_run_event)

        @app.agent(self.logs_topic, name="log-tails")
        async def logs_agent(stream):
            async for event in stream.events():
                await self._guarded(event, self._on_logs, dead_letter=False)

        if self.webhook is not None:
            @app.agent(self.alerts_topic, name="alert-webhook")
            async def webhook_agent(stream):
                async for event in stream.events():
                    await self._guarded(event, self._on_alert, dead_letter=False)

        @app.timer(interval=max(0.2, min(settings.heartbeat_timeout, settings.not_responding_timeout) / 4))
        async def liveness() -> None:
            await self._check_liveness()

        @app.on_rebalance_complete.connect
        async def on_ready(sender: Any, **kwargs: Any) -> None:
            self.ready = True

    async def _guarded(self, event, handler, dead_letter: bool = True) -> None:
        """Decode and handle one event; anything it cannot take goes to the dlq, never crashes the agent.
        Agents on topics the sink also reads pass dead_letter=False: the sink records those itself."""
        msg = event.message
        try:
            env = decode(msg.value)
        except EventError as exc:
            if dead_letter:
                await self._dead_letter(str(exc), msg)
            return
        try:
            await handler(env)
            self.events += 1
        except Rejected as exc:  # bad input, said and counted: not an error of ours
            if dead_letter:
                await self._dead_letter(str(exc), msg, env)
        except Exception as exc:  # Faust acks the event anyway: record it instead of losing it silently
            self.errors += 1
            log.exception("runwatch processors: handling %s failed", env.event_id)
            if dead_letter:
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

    def _encoded(self, env: Envelope, outputs) -> list[tuple[str, bytes, bytes]]:
        """The outputs as messages; an input whose outputs would be larger than a message may be is refused
        (to the dlq, with the reason) before it changes any state: one huge tag set must not stop the worker."""
        out = []
        for topic, run_id, o in outputs:
            value = encode(o)
            if len(value) > self.max_output:
                raise Rejected(f"{env.kind} event: the {o.kind} it leads to would be {len(value):,} bytes; at "
                               f"most {self.max_output:,} (processor_max_message_bytes): not applied")
            out.append((topic, run_id.encode(), value))
        return out

    async def _send(self, messages: list[tuple[str, bytes, bytes]]) -> None:
        for topic, key, value in messages:
            await self.out[topic].send(key=key, value=value)

    async def _state(self, table, run_id: str, load, new):
        """A run's state: the table's, else (after a restart of the embedded broker, whose changelogs are gone)
        what the store says of it, else a new one."""
        state = table.get(run_id)
        if state is None and self.stored is not None:
            state = await asyncio.get_running_loop().run_in_executor(None, load, run_id)
            if state is not None:
                self.reloaded += 1
        return state if state is not None else new()

    async def _on_metrics(self, env: Envelope) -> None:
        state = await self._state(self.metric_state, env.run_id, getattr(self.stored, "metric_state", None),
                                  MetricsLogic.new_state)
        outputs = self.metrics_logic.handle(env, state)
        if outputs:
            messages = self._encoded(env, outputs)
            self.metric_state[env.run_id] = state
            await self._send(messages)

    async def _on_run_event(self, env: Envelope) -> None:
        state = await self._state(self.run_state, env.run_id, getattr(self.stored, "run_state", None),
                                  lambda: RunStateLogic.new_state(env.run_id, env.experiment))
        size = RunStateLogic.check_size(state, env, self.max_output // 4)  # refused before anything changes
        outputs = self.run_logic.handle(env, state, now=time.time(), tails=self.log_tail.get(env.run_id))
        if size is not None:
            state["size"] = size
        now = [o for o in outputs if not isinstance(o[2].payload, RunState)]
        later = [o for o in outputs if isinstance(o[2].payload, RunState)]
        messages = self._encoded(env, now)
        if later:
            self._encoded(env, later)  # a state too large is refused now, while nothing has changed yet
        self.run_state[env.run_id] = state
        await self._send(messages)
        if later:
            self._defer_state(env.run_id, later[-1])

    def _defer_state(self, run_id: str, output) -> None:
        """A run's new state goes out a moment later, once for all its events of that moment: 10,000 separate
        tag calls cost 10,000 snapshots of a growing tag set before (quadratic, docs/reliability.md)."""
        self._states[run_id] = output
        if len(self._states) >= STATES_BATCH:
            asyncio.ensure_future(self._send_states())
        elif self._states_task is None or self._states_task.done():
            self._states_task = asyncio.ensure_future(self._send_states(STATES_WITHIN))

    async def _send_states(self, after: float = 0.0) -> None:
        if after:
            await asyncio.sleep(after)
        states, self._states = self._states, {}
        await self._send([(topic, run_id.encode(), encode(env)) for topic, run_id, env in states.values()])

    async def _on_logs(self, env: Envelope) -> None:
        if isinstance(env.payload, LogBatch):
            tails = self.log_tail.get(env.run_id) or {}
            if update_tails(tails, env.payload):
                self.log_tail[env.run_id] = tails

    async def _on_alert(self, env: Envelope) -> None:
        if isinstance(env.payload, Alert):
            await self.webhook.deliver(env)

    async def _check_liveness(self) -> None:
        """Write a LivenessCheck to the run's own partition for every run whose heartbeats stopped;
        the runs agent applies it in order with the run's other events (tables change only there)."""
        if not self.ready:
            return
        now = time.time()
        s = self.settings
        for run_id, st in list(self.run_state.items()):
            if not st:
                continue
            check = RunStateLogic.liveness_check(st, now, self.started, s.heartbeat_timeout, s.not_responding_timeout)
            if check is None:
                self._checked.pop(run_id, None)
                continue
            marker = (check.if_status, check.last_seen)
            if self._checked.get(run_id) == marker:
                continue  # written already; waiting for the agent to apply it
            self._checked[run_id] = marker
            self.liveness_checks += 1
            env = make_envelope(run_id, st["experiment"], check, next(self._check_seqs.setdefault(run_id, itertools.count())),
                                event_id=derived_id("live", run_id, check.if_status.value, repr(check.last_seen)))
            await self.out["runs"].send(key=run_id.encode(), value=encode(env))

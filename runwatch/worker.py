"""The worker process: the Faust processors, the ClickHouse sink and the read API on one event loop.

It owns the chDB directory (chDB allows one process per data directory), so in the
embedded deployment it is also the only reader: everyone else asks the read API.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from .core import kafka
from .core.retry import retrying
from .core.settings import Settings
from .stack import write_json_atomic

log = logging.getLogger("runwatch.worker")


def clickhouse_client(settings: Settings):
    import clickhouse_connect

    url = settings.clickhouse_url or f"chdb://{settings.home / 'chdb'}"
    extra = {k: v for k, v in (("username", settings.clickhouse_username), ("password", settings.clickhouse_password),
                               ("ca_cert", settings.clickhouse_ca_cert)) if v}
    return clickhouse_connect.get_client(dsn=url, **extra)


def run(settings: Settings) -> None:
    from runwatch.api.filestore import FileStore
    from runwatch.api.live import LiveTail, RunTail
    from runwatch.api.queries import Queries
    from runwatch.processors.app import Processors
    from runwatch.sinks.schema import migrate
    from runwatch.sinks.sink import Sink
    from runwatch.sinks.state import StoredState
    from runwatch.sinks.store import ClickHouseStore

    from .api.server import ReadApi

    bootstrap = settings.resolved_bootstrap()
    if not bootstrap:
        raise SystemExit("runwatch worker: no broker address (set RUNWATCH_BOOTSTRAP_SERVERS or run `runwatch up`)")
    settings.home.mkdir(parents=True, exist_ok=True)
    async def topics() -> None:
        async for attempt in retrying(20):
            with attempt:
                await kafka.ensure_topics(settings, bootstrap)

    asyncio.run(topics())
    asyncio.set_event_loop(asyncio.new_event_loop())

    if settings.worker_role not in ("all", "processors"):
        raise SystemExit(f"runwatch worker: worker_role must be 'all' or 'processors', not {settings.worker_role!r}")
    if settings.worker_role == "processors":
        return _run_processors_only(settings, bootstrap)
    writer_client = clickhouse_client(settings)
    version = migrate(writer_client)
    reader_client = clickhouse_client(settings)
    store = ClickHouseStore(writer_client, settings, lookup=reader_client)
    procs = Processors(settings, bootstrap, StoredState(store))
    sink = Sink(settings, store, bootstrap)
    live = (LiveTail(settings, bootstrap, sink.stored_offset, sink.metrics_partitions)
            if settings.live_max_runs > 0 else None)
    run_tail = RunTail(settings, bootstrap) if settings.live_max_runs > 0 else None
    started = time.time()

    def health() -> dict[str, Any]:
        return {
            "ready": procs.ready and sink.ready,
            "stack_id": settings.stack_id,
            "home": str(settings.home),
            "pid": os.getpid(),
            "uptime_s": round(time.time() - started, 3),
            "schema_version": version,
            "processors": {"ready": procs.ready, "events": procs.events, "dead_letters": procs.dead_letters,
                           "errors": procs.errors, "liveness_checks": procs.liveness_checks,
                           "states_reloaded": procs.reloaded},
            "webhook": ({"url": settings.alert_webhook_url, "delivered": procs.webhook.delivered,
                         "failed": procs.webhook.failed} if procs.webhook else None),
            "sink": {"ready": sink.ready, "error": sink.error, "batches": sink.stats.batches,
                     "events": sink.stats.events, "repeats_dropped": sink.stats.repeats_dropped, "rejected": sink.stats.rejected,
                     "dead_letters": sink.stats.dead_letters, "data_errors": sink.stats.data_errors,
                     "lag": dict(sink.stats.lag),
                     "aggregates_checked": sink.checks.checked, "aggregates_repaired": sink.checks.repaired,
                     "retries": sink.stats.insert_retries, "incarnation": sink.incarnation,
                     "missing_events": sink.seen.holes()},
            "spools": {"sent_spools": orphans["spools"], "sent_events": orphans["events"],
                       "error": orphans["error"]},
            "live": live.health() if live is not None else None,
            "run_tail": run_tail.health() if run_tail is not None else None,
            "broker": bootstrap,
        }

    orphans: dict[str, Any] = {"spools": 0, "events": 0, "error": None}
    api = ReadApi(Queries(reader_client), health, settings, FileStore(settings.files_root() / "runs"),
                  FileStore(settings.files_root() / "snapshots"), live, sink=sink,
                  run_tail=run_tail)
    state_file = settings.home / "worker.json"

    async def start_services() -> None:
        port = await api.start(settings.api_host, settings.api_port, fallback=bool(settings.api_port_fallback))
        write_json_atomic(state_file, {"pid": os.getpid(), "api_port": port, "api_url": f"http://{settings.api_host}:{port}",
                                       "stack_id": settings.stack_id})
        asyncio.ensure_future(sink.run_forever())
        if live is not None:
            asyncio.ensure_future(live.run_forever())
        if run_tail is not None:
            asyncio.ensure_future(run_tail.run_forever())
        if settings.orphan_spool_interval > 0:
            asyncio.ensure_future(_send_orphan_spools(settings, orphans, lambda: sink.ready))
        _quiet_gc()

    # on the loop Faust runs, before Faust starts: the read API and the sink need not wait for the processors'
    # group join (seconds on the embedded broker)
    asyncio.get_event_loop().create_task(start_services())
    try:
        _execute(procs.app)
    finally:
        try:
            state_file.unlink()
        except FileNotFoundError:
            pass


async def _send_orphan_spools(settings: Settings, counts: dict[str, Any], ready) -> None:
    """Send the spools that processes of this home left behind (they ended while the broker was away, or ran
    offline, or `runwatch down` saved what was not stored), as `runwatch sync` does, without being asked."""
    from runwatch.producers.sync import sync_spools

    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(settings.orphan_spool_interval)
        if not ready():
            continue
        try:
            result = await loop.run_in_executor(None, lambda: sync_spools(settings))
            counts["spools"] += result["spools"]
            counts["events"] += result["events"]
            counts["error"] = None
            if result["spools"]:
                log.warning("runwatch worker: sent %d event(s) from %d spool(s) left behind",
                            result["events"], result["spools"])
        except Exception as exc:  # the broker away for a moment: the spools wait for the next look
            counts["error"] = f"{type(exc).__name__}: {exc}"


def _run_processors_only(settings: Settings, bootstrap: str) -> None:
    """A scale-out worker: the Faust app alone (no ClickHouse, no read API); partitions spread the runs."""
    from runwatch.processors.app import Processors

    app = Processors(settings, bootstrap).app

    @app.task
    async def started() -> None:
        _quiet_gc()

    _execute(app)


def _execute(app) -> None:
    """Run the Faust app in this process until it is stopped (either role)."""
    import faust

    worker = faust.Worker(app, loglevel=os.environ.get("RUNWATCH_LOG_LEVEL", "warning"), quiet=True,
                          redirect_stdouts=False)
    # Faust's terminal spinner turns once per log record of any level: to see them all, it sets the root
    # logger to DEBUG, and then every library's debug call (one per message produced) builds a record
    # for nothing. Without it the root logger keeps the level asked for.
    worker.spinner = None
    worker.execute_from_commandline()


def _quiet_gc() -> None:
    """Shorter garbage-collector pauses for the worker, whose pauses delay everything it serves.

    Once started, the worker holds ~100 k objects that live as long as it does (modules, functions,
    Faust's app); a full collection walked them all, and took 40-200 ms on these 2 busy cores
    (docs/performance.md: the freshness and query tails). Freezing them leaves the full collections
    the objects made since; a larger first threshold makes every collection rarer.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)




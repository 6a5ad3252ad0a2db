"""`runwatch sync`: send the spools that processes left behind (offline runs, a broker that never came back)."""

from __future__ import annotations

import asyncio
from typing import Callable

from runwatch.core.errors import StackNotRunning
from runwatch.core import kafka
from runwatch.core.settings import Settings

from .spool import Spool, pending_spools


def sync_spools(settings: Settings, progress: Callable[[str], None] = lambda s: None) -> dict[str, int]:
    bootstrap = settings.resolved_bootstrap()
    if not bootstrap:
        raise StackNotRunning(None)
    return asyncio.run(_sync(settings, bootstrap, progress))


async def _sync(settings: Settings, bootstrap: str, progress) -> dict[str, int]:
    result = {"spools": 0, "events": 0, "busy": 0}
    dirs = pending_spools(settings.home)
    if not dirs:
        return result
    await kafka.ensure_topics(settings, bootstrap)
    producer = kafka.producer(settings, bootstrap, client_id="runwatch-sync")
    await producer.start()
    try:
        for d in dirs:
            spool = Spool.try_claim(d, settings.spool_max_bytes)
            if spool is None:  # its process is alive and will send it itself
                result["busy"] += 1
                continue
            sent = 0
            while True:
                batch, cursor = spool.peek(500)
                if not batch:
                    break
                futures = [await producer.send(r.topic, r.value, key=r.key) for r in batch]
                await asyncio.gather(*futures)
                spool.consume(cursor)
                sent += len(batch)
            spool.close(remove_if_empty=True)  # removes the directory once everything was sent
            result["spools"] += 1
            result["events"] += sent
            progress(f"  {d.name}: {sent} events sent")
    finally:
        await producer.stop()
    return result

"""Sending the spools that processes left behind (offline runs, a broker that went away, what `runwatch down`
saved): `runwatch sync` does it when asked, the embedded worker every few seconds."""

from __future__ import annotations

import asyncio
from typing import Callable

from runwatch.core import kafka
from runwatch.core.errors import StackNotRunning
from runwatch.core.settings import Settings

from .spool import Spool, pending_spools

#: progress(name of the spool, bytes sent so far of all spools, bytes in all spools)
Progress = Callable[[str, int, int], None]


def sync_spools(settings: Settings, progress: Progress | None = None) -> dict[str, int]:
    """Send every spool no live process owns; {"spools": sent, "events": sent, "busy": owned by a live process}."""
    bootstrap = settings.resolved_bootstrap()
    if not bootstrap:
        raise StackNotRunning(None)
    claimed, busy = [], 0
    for d in pending_spools(settings.home):
        spool = Spool.try_claim(d, settings.spool_max_bytes)
        if spool is None:  # its process is alive and sends it itself
            busy += 1
        else:
            claimed.append((d.name, spool))
    result = {"spools": 0, "events": 0, "busy": busy}
    if not claimed:
        return result
    try:
        asyncio.run(_send(settings, bootstrap, claimed, result, progress or (lambda name, done, total: None)))
    finally:
        for _, spool in claimed:
            spool.close(remove_if_empty=True)  # removes a directory once everything in it was sent
    return result


async def _send(settings: Settings, bootstrap: str, claimed: list, result: dict, progress: Progress) -> None:
    total = sum(s.nbytes for _, s in claimed)
    done = 0
    await kafka.ensure_topics(settings, bootstrap)
    producer = kafka.producer(settings, bootstrap, client_id="runwatch-sync")
    await producer.start()
    try:
        for name, spool in claimed:
            progress(name, done, total)
            while True:
                batch, cursor = spool.peek(500)
                if not batch:
                    break
                futures = [await producer.send(r.topic, r.value, key=r.key) for r in batch]
                await asyncio.gather(*futures)
                spool.consume(cursor)
                result["events"] += len(batch)
                done += sum(len(r.value) for r in batch)
                progress(name, done, total)
            result["spools"] += 1
    finally:
        await producer.stop()

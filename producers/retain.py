"""What the embedded broker acknowledged, kept on disk until the store has it.

The embedded broker holds everything in memory: if it dies or is restarted, what it acknowledged and the
sink had not stored yet is gone. So a producer of the embedded stack keeps every event it sent (but
heartbeats, which the next one replaces) in segment files of its own, until the read API says the store
has it (`confirm`); after the broker's restart it sends again what the new broker never had (`stale`).
The segments use the spool's format (producers/spool.py): when a process ends with events not
confirmed yet, its directory is an ordinary spool, which the worker sends (the stages drop what was
stored already).
"""

from __future__ import annotations

import fcntl
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack

from .spool import _LEN, Record, SegmentWriter


@dataclass
class Entry:
    run_id: str
    topic: str  # without the prefix: runs, metrics, logs
    seq: int
    points: int
    seg: int
    pos: int
    length: int
    #: the broker's cluster id when it acknowledged the event
    incarnation: str
    acked: float


class Retention:
    def __init__(self, directory: Path, max_bytes: int):
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self._entries: dict[int, Entry] = {}
        self._next_id = 0
        self._live: dict[int, int] = {}  # segment -> entries in it not released
        self._w = SegmentWriter(self._path, 1)
        self._bytes = 0
        self._lock_fh = None
        #: events released before the store confirmed them (the bound was hit): a broker crash now would lose them
        self.released_unconfirmed = 0
        self.released_unconfirmed_points = 0
        self.confirmed = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _open(self) -> None:
        if self._lock_fh is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(self.dir / "lock", "a+")
        fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _path(self, seg: int) -> Path:
        return self.dir / f"{seg:08d}.seg"

    def add(self, rec: Record, topic: str, seq: int, incarnation: str) -> None:
        self._open()
        data = rec.pack()
        try:
            seg, pos = self._w.write(data)
        except OSError:  # the disk refuses: the event is not kept for a resend, and that is counted
            self.released_unconfirmed += 1
            self.released_unconfirmed_points += rec.points
            return
        self._entries[self._next_id] = Entry(rec.run_id, topic, seq, rec.points, seg, pos, len(data),
                                             incarnation, time.monotonic())
        self._next_id += 1
        self._live[seg] = self._live.get(seg, 0) + 1
        self._bytes += len(data)
        while self._bytes > self.max_bytes and self._entries:  # the oldest go first, counted
            eid = next(iter(self._entries))
            e = self._entries[eid]
            self.released_unconfirmed += 1
            self.released_unconfirmed_points += e.points
            self._release(eid)

    def runs(self) -> list[str]:
        return sorted({e.run_id for e in self._entries.values()})

    def confirm(self, stored: dict[str, dict[str, int]]) -> int:
        """Let go of what the store has: `stored` is {run: {topic: highest seq up to which all is stored}}."""
        done = [eid for eid, e in self._entries.items()
                if e.seq <= (stored.get(e.run_id) or {}).get(e.topic, -1)]
        for eid in done:
            self._release(eid)
        self.confirmed += len(done)
        return len(done)

    def stale(self, incarnation: str, older_than: float | None = None) -> list[int]:
        """Events to send again: acknowledged by another broker lifetime than `incarnation` (the broker the store
        reads now never had them), or (`older_than` seconds) not confirmed long after the store caught up."""
        now = time.monotonic()
        return [eid for eid, e in self._entries.items()
                if e.incarnation != incarnation or (older_than is not None and now - e.acked > older_than)]

    def take(self, ids: list[int]) -> list[tuple[Record, str, int]]:
        """Read these events back (in the order they were sent) and forget them: they go out again, and are kept
        again once acknowledged. (record, topic, seq) each."""
        out = []
        for eid in sorted(ids):
            e = self._entries.get(eid)
            if e is None:
                continue
            with open(self._path(e.seg), "rb") as fh:
                fh.seek(e.pos)
                head = fh.read(4)
                (n,) = _LEN.unpack(head)
                rec = Record(*msgpack.unpackb(fh.read(n), raw=False)[:7])
            out.append((rec, e.topic, e.seq))
            self._release(eid)
        return out

    def _release(self, eid: int) -> None:
        e = self._entries.pop(eid)
        self._bytes -= e.length
        left = self._live[e.seg] = self._live[e.seg] - 1
        if left == 0:
            del self._live[e.seg]
            if e.seg != self._w.seg:
                self._path(e.seg).unlink(missing_ok=True)

    def close(self) -> None:
        """What is confirmed goes; what is not stays as a spool for the worker to send."""
        self._w.close()
        if self._lock_fh is None:
            return
        if not self._entries:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            for seg in {p for p in range(1, self._w.seg + 1)} - set(self._live):
                self._path(seg).unlink(missing_ok=True)
        self._lock_fh.close()
        self._lock_fh = None


def retention_dir(spool_dir: Path) -> Path:
    return spool_dir.with_name(spool_dir.name + "-sent")


__all__ = ["Retention", "retention_dir"]

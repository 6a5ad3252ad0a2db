"""The on-disk spool: encoded messages kept in order while the broker is away, bounded in bytes."""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import msgpack

_LEN = struct.Struct("<I")
SEGMENT_BYTES = 8 << 20


#: Bytes past `max_bytes` that only point-less control events may use.
CONTROL_RESERVE = 256 << 10


@dataclass(frozen=True)
class Record:
    topic: str
    key: bytes
    value: bytes
    run_id: str
    points: int
    #: the event's seq in its run and topic (-1: not known, in spools written before it was kept)
    seq: int = -1
    #: kept by the embedded stack's producers until the store has it (not heartbeats: the next one replaces it)
    retain: bool = True

    def pack(self) -> bytes:
        body = msgpack.packb([self.topic, self.key, self.value, self.run_id, self.points, self.seq, self.retain],
                             use_bin_type=True)
        return _LEN.pack(len(body)) + body


class SegmentWriter:
    """Appends records to numbered segment files (`path_of(n)`), straight to the file: unbuffered, so a full
    disk fails the write of that record (and it is refused and counted) instead of a later buffer flush losing
    records already counted as kept. A record cut short by the disk filling is cut off again, so the segment
    stays readable. The spool and the producers' retention (producers/retain.py) write this way."""

    def __init__(self, path_of, seg: int):
        self.path_of = path_of
        self.seg = seg
        self.fh = None

    def write(self, data: bytes) -> tuple[int, int]:
        """Write one record; return (segment, position) where it starts. OSError when the disk refuses it."""
        if self.fh is not None and self.fh.tell() >= SEGMENT_BYTES:
            self.fh.close()
            self.fh = None
            self.seg += 1
        if self.fh is None:
            self.fh = open(self.path_of(self.seg), "ab", buffering=0)
        start = self.fh.tell()
        try:
            written = self.fh.write(data)
            if written != len(data):
                raise OSError(28, f"short write ({written} of {len(data)} bytes)")
        except OSError:
            try:
                self.fh.truncate(start)
            except OSError:
                pass
            raise
        return self.seg, start

    def next_segment(self) -> None:
        """Start a fresh segment with the next write."""
        self.close()
        self.seg += 1

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class Spool:
    """One process's spool: a directory of numbered segment files read oldest first.

    The directory is locked (flock) by its owner while it lives, so `runwatch sync`
    only drains spools whose process has gone. A segment is deleted once every record
    in it was acknowledged by the broker; a crash mid-segment resends that segment
    (downstream stages drop the repeats by (source, seq)).
    """

    def __init__(self, directory: Path, max_bytes: int, *, lock: bool = True):
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self._lock_fh = None
        self._w = SegmentWriter(self._seg_path, 0)
        self._read_seg = 0
        self._read_pos = 0
        self._bytes = 0
        self._opened = False
        self._lock = lock

    # -- opening -------------------------------------------------------------------
    def _open(self) -> None:
        if self._opened:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._lock:
            self._lock_fh = open(self.dir / "lock", "a+")
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        segs = self._segments()
        self._bytes = sum(p.stat().st_size for p in segs)
        self._read_seg = int(segs[0].stem) if segs else 1
        self._w.seg = int(segs[-1].stem) if segs else 1
        self._opened = True

    @classmethod
    def try_claim(cls, directory: Path, max_bytes: int) -> "Spool | None":
        """Open another process's spool for draining, or None while its owner still holds it."""
        spool = cls(directory, max_bytes)
        try:
            spool._open()
        except BlockingIOError:
            if spool._lock_fh:
                spool._lock_fh.close()
            return None
        return spool

    def _segments(self) -> list[Path]:
        return sorted(self.dir.glob("*.seg"), key=lambda p: int(p.stem))

    def _seg_path(self, n: int) -> Path:
        return self.dir / f"{n:08d}.seg"

    # -- writing -------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self._bytes

    def append(self, records: list[Record]) -> list[Record]:
        """Write records in order; return those refused because the bound was hit."""
        self._open()
        refused: list[Record] = []
        for rec in records:
            data = rec.pack()
            # Control events (no points: status, tags, heartbeats carrying the drop count) may use a small
            # reserve past the bound, so that a full spool still records that the run ended and what it lost.
            limit = self.max_bytes + (CONTROL_RESERVE if rec.points == 0 else 0)
            if self._bytes + len(data) > limit:
                refused.append(rec)
                continue
            try:
                self._write(data)
            except OSError:  # disk full and the like: count it, never raise into training
                refused.append(rec)
        return refused

    def _write(self, data: bytes) -> None:
        self._w.write(data)
        self._bytes += len(data)

    # -- reading -------------------------------------------------------------------
    def peek(self, max_records: int = 500) -> tuple[list[Record], tuple[int, int]]:
        """The oldest unsent records, and a cursor to pass to `consume` once they are acked."""
        self._open()

        out: list[Record] = []
        seg, pos = self._read_seg, self._read_pos
        while len(out) < max_records:
            path = self._seg_path(seg)
            if not path.exists():
                if seg < self._w.seg:
                    seg, pos = seg + 1, 0
                    continue
                break
            with open(path, "rb") as fh:
                fh.seek(pos)
                while len(out) < max_records:
                    head = fh.read(4)
                    if len(head) < 4:
                        break
                    (n,) = _LEN.unpack(head)
                    body = fh.read(n)
                    if len(body) < n:  # a torn write at a crash: the rest of this segment is unusable
                        break
                    out.append(Record(*msgpack.unpackb(body, raw=False)[:7]))
                    pos += 4 + n
            if len(out) >= max_records or seg >= self._w.seg:
                break
            seg, pos = seg + 1, 0
        return out, (seg, pos)

    def consume(self, cursor: tuple[int, int]) -> None:
        """Forget everything before `cursor`; delete segments that were read whole."""
        seg, pos = cursor
        for n in range(self._read_seg, seg):
            path = self._seg_path(n)
            try:
                self._bytes -= path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
        self._read_seg, self._read_pos = seg, pos
        path = self._seg_path(seg)
        if seg == self._w.seg and path.exists() and pos >= path.stat().st_size:
            # the writer's segment was read whole: start a fresh one
            self._w.next_segment()
            self._bytes -= path.stat().st_size
            path.unlink()
            self._read_seg, self._read_pos = self._w.seg, 0
        if self._bytes <= 0:
            self._bytes = 0

    def close(self, *, remove_if_empty: bool = True) -> None:
        self._w.close()
        if self._opened and remove_if_empty and self._bytes == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None
        self._opened = False


def spool_root(home: Path) -> Path:
    return Path(home) / "spool"


def pending_spools(home: Path) -> list[Path]:
    root = spool_root(home)
    if not root.exists():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)


def spool_dir_for(home: Path, source_key: str) -> Path:
    return spool_root(home) / source_key.replace(":", "-").replace(os.sep, "_")

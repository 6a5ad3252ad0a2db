"""The hot buffer: every value a process logs, of every kind, under one bound (docs/architecture.md).

A buffered point's layout, defined here once:

- a *hot point* is the tuple `(gidx, step, time, value)`: `gidx` indexes the emitter's name table (run,
  metric, column, dtype), `step` is an int, `time` a float of seconds since the epoch, and `value` a float
  (in `Buffer.num`, which `Run.log`'s fast path appends to directly) or a str (in `Buffer.text`);
- a *column* chunk holds points as arrays: gidx uint32, step int64, ts int64 (µs), value float64 (NaN for
  a string point, whose text is in `texts`): 28 bytes a number instead of about 150 for a hot tuple;
- an *on-disk* chunk (`OnDisk`) is a column chunk written, raw, to the buffer's spill file: an unlinked file
  in the spool's directory, so nothing is left behind even by a crash.

The background thread moves everything buffered into the *backlog* every flush (`take_into_backlog`) and packs
it from there a group at a time, oldest first, moving what was added meanwhile into the backlog between groups.
When it falls behind, the hot lists reach `hot_max` points and the logging thread turns them into columns
itself (`compact`): bounded work, about 0.1 µs a point, measured in `compact_seconds`. Memory is bounded by
bytes: past `spill_mark` bytes in memory, a chunk that arrives (a `log_list`, a table, compacted hot points) is
written to the spill file by the thread that adds it (a write of 28 bytes a number to the page cache, far
cheaper than encoding it; measured in `spill_seconds`), and the background thread moves the backlog's newest
chunks there too; they are read back in order when their turn comes. Only past `max_bytes` in memory, with the
disk's share of the spool full, is what is logged dropped, and counted.
"""

from __future__ import annotations

import collections
import itertools
import os
import pickle
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

#: What CPython holds for one hot tuple: the tuple (72 bytes), its float time and float value (24 each),
#: and the list's pointer to it; gidx and small steps are cached ints.
HOT_POINT_BYTES = 128
#: A number as columns: uint32 + int64 + int64 + float64.
COLUMN_POINT_BYTES = 28


@dataclass
class Columns:
    gidx: np.ndarray
    step: np.ndarray
    ts: np.ndarray  # µs since the epoch
    value: np.ndarray
    #: a chunk of string points: their texts (value is NaN)
    texts: list[str] | None = None
    text_bytes: int = 0

    def __len__(self) -> int:
        return len(self.gidx)

    @property
    def nbytes(self) -> int:
        return COLUMN_POINT_BYTES * len(self.gidx) + self.text_bytes


def columns(gidx: np.ndarray, step: np.ndarray, ts_seconds: float, value: np.ndarray) -> Columns:
    """Numbers logged at once (log_list and log_table of arrays, a row's numbers)."""
    n = len(gidx)
    return Columns(np.asarray(gidx, np.uint32), np.asarray(step, np.int64), np.full(n, int(ts_seconds * 1e6), np.int64),
                   np.asarray(value, np.float64))


def hot_numbers(points: list[tuple]) -> Columns:
    n = len(points)
    flat = np.fromiter(itertools.chain.from_iterable(points), dtype=np.float64, count=4 * n).reshape(n, 4)
    return Columns(flat[:, 0].astype(np.uint32), flat[:, 1].astype(np.int64), (flat[:, 2] * 1e6).astype(np.int64),
                   flat[:, 3].copy())


def hot_texts(points: list[tuple]) -> Columns:
    n = len(points)
    texts = [p[3] for p in points]
    return Columns(np.fromiter((p[0] for p in points), np.uint32, n), np.fromiter((p[1] for p in points), np.int64, n),
                   (np.fromiter((p[2] for p in points), np.float64, n) * 1e6).astype(np.int64), np.full(n, np.nan),
                   texts, sum(len(t) for t in texts))


@dataclass
class OnDisk:
    """A column chunk in the spill file: where it is, and how many points it holds."""
    offset: int
    length: int
    npoints: int
    nbytes = 0  # in memory

    def __len__(self) -> int:
        return self.npoints


class Buffer:
    """The one bounded buffer. Any thread appends; the background thread takes."""

    def __init__(self, batch_max: int, hot_max: int, max_bytes: int, drop: Callable[[int, int], None]):
        #: hot numbers; Run.log's fast path appends here itself (a plain list append is the cheapest thing)
        self.num: list[tuple] = []
        self.text: list[tuple] = []
        self.text_bytes = 0
        self.chunks: list[Columns | OnDisk] = []
        self.chunk_bytes = 0  # in memory
        self.chunk_points = 0
        #: hot points past which the logging thread turns them into columns itself; never more than a quarter of
        #: the memory bound as hot tuples (another quarter columns before they spill, and what the background
        #: thread holds while it spills: within the bound)
        self.hot_max = max(1, min(max(hot_max, batch_max), max_bytes // 4 // HOT_POINT_BYTES))
        #: points that wake the background thread early
        self.batch_max = min(batch_max, self.hot_max)
        #: the hot list's length at which log() calls `Emitter.full` next: `batch_max` (wake the thread), then
        #: `hot_max` (turn the points into columns); back to `batch_max` when the list is swapped out
        self.mark = batch_max
        self.max_bytes = max_bytes
        #: memory in bytes past which chunks go to the spill file
        self.spill_mark = max_bytes // 4
        self._drop = drop  # (gidx of the first point dropped, points) -> counted on its run
        self._lock = threading.Lock()
        #: (is text, a list swapped out, cycles left): a thread that loaded a list just before the swap appends
        #: to it a moment later; the list is emptied at once and looked at again for two more takes
        self._retired: list[tuple[bool, list, int]] = []
        self.compactions = 0
        self.compact_seconds = 0.0
        self.dropped = 0
        #: taken but not packed yet, oldest first (the background thread's)
        self.backlog: collections.deque[Columns | OnDisk] = collections.deque()
        self.backlog_bytes = 0   # in memory
        self.backlog_points = 0  # in memory and on disk
        self.backlog_in = 0      # points ever moved into the backlog
        self.backlog_out = 0     # points ever taken out of it to be packed
        #: the spill file: where (set by the emitter), whether the disk has room for n more bytes (the spool's
        #: bound, which it shares), and what went through it
        self.spill_dir: Path | None = None
        self.disk_room: Callable[[int], bool] = lambda n: False
        self._spill = None  # opened at the first spill
        self._spill_end = 0
        self._spill_unread = 0
        self.spilled_points = 0
        self.spill_seconds = 0.0  # spent writing to it by the threads that log

    # -- accounting ---------------------------------------------------------------------------
    @property
    def points(self) -> int:
        return len(self.num) + len(self.text) + self.chunk_points + self.backlog_points

    @property
    def nbytes(self) -> int:
        """Memory held, in bytes: hot points, columns and the backlog's columns in memory (not what is on disk)."""
        return ((len(self.num) + len(self.text)) * HOT_POINT_BYTES + self.text_bytes + self.chunk_bytes
                + self.backlog_bytes)

    @property
    def spill_file_bytes(self) -> int:
        """The spill file's size on disk (it is emptied once read back whole)."""
        return self._spill_end

    def _room(self, nbytes: int) -> bool:
        return self.nbytes + nbytes <= self.max_bytes

    # -- adding (any thread) ------------------------------------------------------------------------
    def add_text(self, point: tuple) -> bool:
        """A string point; True when the background thread should be woken."""
        size = HOT_POINT_BYTES + len(point[3])
        if not self._room(size):
            self._drop(point[0], 1)
            return True
        self.text_bytes += len(point[3])
        self.text.append(point)
        return self._hot_added()

    def add_number(self, point: tuple) -> bool:
        """A number that did not take the fast path (a given step, an int, the first value of a name)."""
        if not self._room(HOT_POINT_BYTES):
            self._drop(point[0], 1)
            return True
        self.num.append(point)
        return self._hot_added()

    def _hot_added(self) -> bool:
        """After a slow-path append: columns past `hot_max` (or when the texts fill half the memory bound);
        True when the background thread should be woken."""
        hot = self._hot()
        if hot >= self.hot_max or self.text_bytes > self.max_bytes // 4:
            self.compact()
            return True
        return hot >= self.batch_max

    def add_columns(self, cols: Columns) -> bool:
        """Numbers (or strings) logged at once; True when the background thread should be woken."""
        if not len(cols):
            return False
        self._admit([cols])
        return self.chunk_points >= self.batch_max

    def _admit(self, new: list[Columns]) -> None:
        """Chunks into the buffer: in memory under `spill_mark`, else to the spill file, else in memory under
        `max_bytes`, else dropped and counted."""
        for cols in new:
            item: Columns | OnDisk | None = cols
            if self.nbytes + cols.nbytes > self.spill_mark:
                t0 = time.perf_counter()
                item = self._write_spill(cols)
                self.spill_seconds += time.perf_counter() - t0
                if item is None and self._room(cols.nbytes):
                    item = cols
            if item is None:
                self._drop(int(cols.gidx[0]), len(cols))
                continue
            with self._lock:
                self.chunks.append(item)
                self.chunk_bytes += item.nbytes
                self.chunk_points += len(item)

    def _write_spill(self, cols: Columns) -> OnDisk | None:
        """`cols` appended to the spill file (any thread): where, or None when the disk has no room."""
        if self.spill_dir is None:
            return None
        data = pickle.dumps(cols, protocol=5)
        if not self.disk_room(len(data)):
            return None
        with self._lock:
            try:
                if self._spill is None:
                    self.spill_dir.mkdir(parents=True, exist_ok=True)
                    self._spill = tempfile.TemporaryFile(dir=self.spill_dir, prefix="spill-")
                os.pwrite(self._spill.fileno(), data, self._spill_end)
            except OSError:  # a full disk and the like: never raised into training
                return None
            at = self._spill_end
            self._spill_end += len(data)
            self._spill_unread += len(data)
            self.spilled_points += len(cols)
        return OnDisk(at, len(data), len(cols))

    def _hot(self) -> int:
        return len(self.num) + len(self.text)

    def full(self) -> None:
        """The logging thread found `batch_max` points or more: past `hot_max` it turns them into columns (the
        background thread is behind); past `max_bytes`, the newest hot points are dropped and counted."""
        if self._hot() >= self.hot_max:
            self.compact()
        over = self.nbytes - self.max_bytes
        if over > 0:
            num = self.num
            n = min(len(num), over // HOT_POINT_BYTES + 1)
            dropped = 0
            first = None
            for _ in range(n):
                try:
                    first = num.pop()[0]
                    dropped += 1
                except IndexError:
                    break
            if dropped:
                self._drop(first, dropped)

    def compact(self) -> None:
        t0 = time.perf_counter()
        with self._lock:
            num, text = self._swap()
        cols = [c for c in (hot_numbers(num) if num else None, hot_texts(text) if text else None) if c is not None]
        self.compactions += 1
        self.compact_seconds += time.perf_counter() - t0
        self._admit(cols)

    def _swap(self) -> tuple[list, list]:
        """Swap the hot lists out (with the lock held) and empty them, late appends included."""
        swapped = [(False, self.num), (True, self.text)]
        self.num, self.text = [], []
        self.mark = self.batch_max
        text_bytes, self.text_bytes = self.text_bytes, 0
        late: list[list] = [[], []]
        keep = []
        for is_text, lst, left in self._retired:
            n = len(lst)
            if n:
                late[is_text].extend(lst[:n])
                del lst[:n]  # atomic under the GIL; a late append lands after it
            if left > 0:
                keep.append((is_text, lst, left - 1))
        taken = []
        for is_text, lst in swapped:
            n = len(lst)
            taken.append(late[is_text] + lst[:n] if late[is_text] else lst[:n])
            del lst[:n]
            keep.append((is_text, lst, 2))
        self._retired = keep
        if late[1]:
            text_bytes += sum(len(p[3]) for p in late[1])
        return taken[0], taken[1]

    # -- taking (the background thread) ----------------------------------------------------------
    def take_into_backlog(self) -> int:
        """Everything buffered now moved to the backlog's end, as columns (or on disk); the points moved."""
        with self._lock:
            num, text = self._swap()
            chunks, self.chunks = self.chunks, []
            mem, self.chunk_bytes = self.chunk_bytes, 0
            n, self.chunk_points = self.chunk_points, 0
        for hot in (hot_numbers(num) if num else None, hot_texts(text) if text else None):
            if hot is not None:
                chunks.append(hot)
                mem += hot.nbytes
                n += len(hot)
        self.backlog.extend(chunks)
        self.backlog_bytes += mem
        self.backlog_points += n
        self.backlog_in += n
        return n

    def next_group(self, max_points: int) -> list[Columns]:
        """The backlog's oldest chunks, about `max_points` points (at least one chunk), out of the backlog."""
        out: list[Columns] = []
        n = 0
        backlog = self.backlog
        while backlog and (n < max_points or not out):
            item = backlog.popleft()
            if isinstance(item, OnDisk):
                cols = pickle.loads(os.pread(self._spill.fileno(), item.length, item.offset))
                with self._lock:
                    self._spill_unread -= item.length
            else:
                cols = item
                self.backlog_bytes -= cols.nbytes
            out.append(cols)
            n += len(cols)
        self.backlog_points -= n
        self.backlog_out += n
        with self._lock:
            if self._spill is not None and self._spill_unread == 0 and self._spill_end:
                os.ftruncate(self._spill.fileno(), 0)  # nothing left to read back: the file starts again
                self._spill_end = 0
        return out

    def spill(self) -> int:
        """The backlog's newest chunks in memory moved to the spill file until its memory is under `spill_mark`
        (while the disk has room); the points moved."""
        moved = 0
        backlog = self.backlog
        i = len(backlog) - 1
        while self.nbytes > self.spill_mark and i >= 0:
            item = backlog[i]
            if isinstance(item, Columns):
                ref = self._write_spill(item)
                if ref is None:
                    break
                backlog[i] = ref
                self.backlog_bytes -= item.nbytes
                moved += len(item)
            i -= 1
        return moved

    def close(self) -> None:
        with self._lock:
            if self._spill is not None:
                self._spill.close()
                self._spill = None


__all__ = ["Buffer", "Columns", "OnDisk", "columns", "HOT_POINT_BYTES", "COLUMN_POINT_BYTES"]

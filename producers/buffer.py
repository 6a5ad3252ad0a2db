"""The hot buffer: every value a process logs, of every kind, under one bound (docs/architecture.md).

A buffered point's layout, defined here once:

- a *hot point* is the tuple `(gidx, step, time, value)`: `gidx` indexes the emitter's name table (run,
  metric, column, dtype), `step` is an int, `time` a float of seconds since the epoch, and `value` a float
  (in `Buffer.num`, which `Run.log`'s fast path appends to directly) or a str (in `Buffer.text`);
- a *column* chunk holds points as arrays: gidx uint32, step int64, ts int64 (µs), value float64 (NaN for
  a string point, whose text is in `texts`): 28 bytes a number instead of about 150 for a hot tuple.

The background thread takes everything every flush (`take`). When it falls behind, the hot lists reach
`hot_max` points and the logging thread turns them into columns itself (`compact`): bounded work, about
0.1 µs a point, measured in `compact_seconds`. Past `max_bytes` in all (hot and columns), what is
logged is dropped and counted: the emitter keeps the buffer well below it by moving what it cannot send
yet to its outbox and then the spool on disk.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
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


class Buffer:
    """The one bounded buffer. Any thread appends; the background thread takes."""

    def __init__(self, batch_max: int, hot_max: int, max_bytes: int, drop: Callable[[int, int], None]):
        #: hot numbers; Run.log's fast path appends here itself (a plain list append is the cheapest thing)
        self.num: list[tuple] = []
        self.text: list[tuple] = []
        self.text_bytes = 0
        self.chunks: list[Columns] = []
        self.chunk_bytes = 0
        #: points that wake the background thread early
        self.batch_max = batch_max
        self.hot_max = max(hot_max, batch_max)
        #: the hot list's length at which log() calls `Emitter.full` next: `batch_max` (wake the thread), then
        #: `hot_max` (turn the points into columns); back to `batch_max` when the list is swapped out
        self.mark = batch_max
        self.max_bytes = max_bytes
        self._drop = drop  # (gidx of the first point dropped, points) -> counted on its run
        self._lock = threading.Lock()
        #: (is text, a list swapped out, cycles left): a thread that loaded a list just before the swap appends
        #: to it a moment later; the list is emptied at once and looked at again for two more takes
        self._retired: list[tuple[bool, list, int]] = []
        self.compactions = 0
        self.compact_seconds = 0.0
        self.dropped = 0

    # -- accounting ---------------------------------------------------------------------------
    @property
    def points(self) -> int:
        return len(self.num) + len(self.text) + sum(len(c) for c in self.chunks)

    @property
    def nbytes(self) -> int:
        return (len(self.num) + len(self.text)) * HOT_POINT_BYTES + self.text_bytes + self.chunk_bytes

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
        return self._hot() >= self.batch_max

    def add_number(self, point: tuple) -> bool:
        """A number that did not take the fast path (a given step, an int, the first value of a name)."""
        if not self._room(HOT_POINT_BYTES):
            self._drop(point[0], 1)
            return True
        self.num.append(point)
        return len(self.num) >= self.batch_max

    def add_columns(self, cols: Columns) -> bool:
        if not len(cols):
            return False
        if not self._room(cols.nbytes):
            self._drop(int(cols.gidx[0]), len(cols))
            return True
        with self._lock:
            self.chunks.append(cols)
            self.chunk_bytes += cols.nbytes
        return self.chunk_bytes >= self.batch_max * COLUMN_POINT_BYTES

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
        with self._lock:
            self.chunks.extend(cols)
            self.chunk_bytes += sum(c.nbytes for c in cols)
        self.compactions += 1
        self.compact_seconds += time.perf_counter() - t0

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
    def take(self) -> list[Columns]:
        """Everything buffered now, as columns, and the buffer empty."""
        with self._lock:
            num, text = self._swap()
            chunks, self.chunks = self.chunks, []
            self.chunk_bytes = 0
        if num:
            chunks.append(hot_numbers(num))
        if text:
            chunks.append(hot_texts(text))
        return chunks


__all__ = ["Buffer", "Columns", "columns", "HOT_POINT_BYTES", "COLUMN_POINT_BYTES"]

"""Log lines of a run's files, batched into LogBatch events (one sequence space per file)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from runwatch.core.events import LogBatch

#: Lines and characters per LogBatch message (well under the producer's request size).
MAX_BATCH_LINES = 2000
MAX_BATCH_CHARS = 1 << 20


class LogWriter:
    """Collects lines per file from any thread; `flush()` hands them to the emitter as LogBatch events."""

    def __init__(self, emitter: Any, run_id: str, experiment: str, max_line: int = 16_384):
        self.em = emitter
        self.run_id = run_id
        self.experiment = experiment
        self.max_line = max_line
        self.counts: dict[str, int] = {}      # file -> lines written (the next seq)
        self._pending: dict[str, list] = {}   # file -> [stream, node, rank, first_seq, [ts], [lines], chars]
        self._sealed: list[LogBatch] = []
        self._lock = threading.Lock()

    def line(self, file: str, text: str, stream: str = "stdout", node: int = 0, rank: int = 0) -> None:
        pieces = [text[i:i + self.max_line] for i in range(0, len(text), self.max_line)] or [""]
        now_us = int(time.time() * 1e6)
        with self._lock:
            for piece in pieces:
                p = self._pending.get(file)
                if p is not None and (p[0] != stream or len(p[5]) >= MAX_BATCH_LINES or p[6] >= MAX_BATCH_CHARS):
                    self._seal(file)
                    p = None
                if p is None:
                    p = self._pending[file] = [stream, node, rank, self.counts.get(file, 0), [], [], 0]
                p[4].append(now_us)
                p[5].append(piece)
                p[6] += len(piece)
                self.counts[file] = self.counts.get(file, 0) + 1

    def text(self, file: str, text: str, stream: str = "system", node: int = 0, rank: int = 0) -> None:
        """A whole text (e.g. a JSON document) as the lines of `file`."""
        for ln in text.splitlines():
            self.line(file, ln, stream, node, rank)

    def _seal(self, file: str) -> None:
        stream, node, rank, first, ts, lines, _ = self._pending.pop(file)
        self._sealed.append(LogBatch(file=file, node=node, rank=rank, stream=stream, first_seq=first,
                                     ts=np.asarray(ts, "<i8").tobytes(), lines=lines))

    def flush(self) -> int:
        """Hand every pending line to the emitter (in order per file); return the number of batches."""
        with self._lock:
            for file in list(self._pending):
                self._seal(file)
            batches, self._sealed = self._sealed, []
        for b in batches:
            self.em.send_control(self.run_id, self.experiment, b)
        return len(batches)


class LogFileHandler(logging.Handler):
    """A logging handler that writes records as lines of one of the run's log files."""

    def __init__(self, writer: LogWriter, file: str, node: int = 0):
        super().__init__()
        self.writer, self.file, self.node = writer, file, node
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.text(self.file, self.format(record), "system", self.node)
        except Exception:  # a log handler must never raise into the code that logged
            self.handleError(record)

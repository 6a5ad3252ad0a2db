"""The output of an interactive run: `start_logging(capture_output=True)` (docs/system-metrics.md).

What the process prints to stdout and stderr goes to the terminal first, unchanged and at once, and then, line
by line, into the run's `azureml-logs/70_driver_log_0.txt` (the file a submitted run's rank 0 writes, so that
`wait_for_completion(show_output=True)`, `runwatch logs` and the widget show it alike). Python `logging` records
also go to `logs/<logger name>.log` and warnings to `logs/py.warnings.log`. One tee per process, whatever the
number of runs capturing: each line goes to every run capturing when it is printed. Nothing here raises into
the code that printed.
"""

from __future__ import annotations

import atexit
import io
import logging
import sys
import threading
import warnings
from typing import Any

from runwatch.core.names import driver_log

from .logs import LogWriter

WARNINGS_LOG = "logs/py.warnings.log"


def in_notebook() -> bool:
    """True in a Jupyter kernel (capture is off there unless asked for: the cell's output is the notebook's)."""
    shell = sys.modules.get("IPython")
    try:
        ip = shell.get_ipython() if shell is not None else None  # type: ignore[attr-defined]
    except Exception:
        return False
    return ip is not None and hasattr(ip, "kernel")  # ZMQInteractiveShell; a terminal IPython has none


class _Tee(io.TextIOBase):
    """sys.stdout or sys.stderr: writes through to the stream it replaced, then hands whole lines on."""

    def __init__(self, hub: "_Hub", original: Any, name: str):
        self._hub, self._original, self._name = hub, original, name
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        n = self._original.write(s)  # the terminal first: nothing printed waits on runwatch
        try:
            with self._lock:
                text = self._partial + s
                *lines, self._partial = text.split("\n")
            for line in lines:
                self._hub.line(line, self._name)
        except Exception:
            pass
        return n if isinstance(n, int) else len(s)

    def flush(self) -> None:
        self._original.flush()

    def end(self) -> None:
        with self._lock:
            rest, self._partial = self._partial, ""
        if rest:
            self._hub.line(rest, self._name)

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, isatty, buffer...: the original's
        return getattr(self._original, name)

    def isatty(self) -> bool:
        return self._original.isatty()

    def fileno(self) -> int:
        return self._original.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._original, "encoding", "utf-8")

    def writable(self) -> bool:
        return True


class _Records:
    """Python logging records, as lines of logs/<logger name>.log of every capturing run: taken where each record
    is made (the record factory), so that the root logger keeps no handler of ours and `logging.basicConfig()`
    still configures it; every record a logger lets through is seen, whatever its handlers."""

    def __init__(self, hub: "_Hub"):
        self._hub = hub
        self.previous = logging.getLogRecordFactory()
        self.formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        try:
            self._hub.text(f"logs/{record.name}.log", self.formatter.format(record), "system")
        except Exception:
            pass
        return record


class _Hub:
    """The process's one tee, its logging handler, its warnings hook and the thread that flushes the lines."""

    def __init__(self, interval: float):
        self.writers: dict[str, LogWriter] = {}
        self.lock = threading.Lock()
        self.interval = interval
        self.stop = threading.Event()
        self.out = _Tee(self, sys.stdout, "stdout")
        self.err = _Tee(self, sys.stderr, "stderr")
        self.records = _Records(self)
        self._showwarning = warnings.showwarning
        sys.stdout, sys.stderr = self.out, self.err
        logging.setLogRecordFactory(self.records)
        hub = self

        def showwarning(message, category, filename, lineno, file=None, line=None):
            hub._showwarning(message, category, filename, lineno, file, line)  # printed (to the tee) as before
            try:
                hub.text(WARNINGS_LOG, warnings.formatwarning(message, category, filename, lineno, line).rstrip(),
                         "stderr")
            except Exception:
                pass

        self._hook = showwarning
        warnings.showwarning = showwarning
        self.thread = threading.Thread(target=self._main, name="runwatch-capture", daemon=True)
        self.thread.start()
        atexit.register(self.flush)  # after the emitter's own exit hook was registered: runs before it

    def _writers(self) -> list[LogWriter]:
        with self.lock:
            return list(self.writers.values())

    def line(self, text: str, stream: str) -> None:
        # a progress bar's '\r'-separated redraws are lines of their own; empty pieces between them are not
        pieces = [p for p in text.split("\r") if p] if "\r" in text else [text]
        file = driver_log(0)
        for w in self._writers():
            for piece in pieces:
                w.line(file, piece, stream)

    def text(self, file: str, text: str, stream: str) -> None:
        for w in self._writers():
            w.text(file, text, stream)

    def flush(self) -> None:
        for w in self._writers():
            try:
                w.flush()
            except Exception:
                pass

    def _main(self) -> None:
        while not self.stop.wait(self.interval):
            self.flush()

    def remove(self) -> None:
        """Put back what was replaced (where nobody replaced it since)."""
        self.stop.set()
        self.out.end()
        self.err.end()
        if sys.stdout is self.out:
            sys.stdout = self.out._original
        if sys.stderr is self.err:
            sys.stderr = self.err._original
        if logging.getLogRecordFactory() is self.records:
            logging.setLogRecordFactory(self.records.previous)
        if warnings.showwarning is self._hook:
            warnings.showwarning = self._showwarning


_hub: _Hub | None = None
_lock = threading.Lock()


def start(run: Any) -> None:
    """Capture this process's output into `run` until `stop(run)`."""
    global _hub
    with _lock:
        if _hub is None:
            _hub = _Hub(run._settings.flush_interval)
        with _hub.lock:
            _hub.writers[run.id] = LogWriter(run._em, run.id, run.experiment.name, run._settings.max_log_line)


def flush(run_id: str) -> None:
    """Every line the run captured so far, handed to the emitter (before its status changes)."""
    hub = _hub
    if hub is None:
        return
    hub.out.flush()
    w = hub.writers.get(run_id)
    if w is not None:
        w.flush()


def stop(run_id: str) -> None:
    global _hub
    with _lock:
        hub = _hub
        if hub is None or run_id not in hub.writers:
            return
        if len(hub.writers) == 1:  # the last run capturing: a partial last line is its last line
            hub.out.end()
            hub.err.end()
        w = hub.writers[run_id]
        w.flush()
        with hub.lock:
            del hub.writers[run_id]
        if not hub.writers:
            hub.remove()
            _hub = None


def capturing() -> list[str]:
    hub = _hub
    return list(hub.writers) if hub is not None else []

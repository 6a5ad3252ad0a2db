"""Process slots of a local compute target, and the first-come first-served queue in front of them.

Slots are files locked with flock(2): a launcher that dies (even by SIGKILL) gives its
slots back at once, because the kernel drops its locks. The queue is a directory of
tickets named by arrival time; only the oldest live ticket may take slots.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

import psutil


class SlotPool:
    def __init__(self, home: Path, target: str, slots: int):
        self.dir = Path(home) / "compute" / target
        self.slots = slots
        self.queue = self.dir / "queue"
        self.queue.mkdir(parents=True, exist_ok=True)

    def acquire(self, run_id: str, n: int, should_stop: Callable[[], bool],
                on_wait: Callable[[int], None] | None = None, poll: float = 0.2) -> list[int] | None:
        """Block until `n` slots are ours; return their lock fds, or None when `should_stop()` said so."""
        if n > self.slots:
            raise ValueError(f"a run with {n} processes cannot fit compute with {self.slots} slots")
        ticket = self.queue / f"{time.time_ns():020d}-{os.getpid()}-{run_id}"
        ticket.write_text(str(os.getpid()))
        last_ahead = -1
        try:
            while True:
                with open(self.dir / "lock", "a+") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    ahead = self._ahead_of(ticket.name)
                    if ahead == 0:
                        fds = self._try_slots(n)
                        if fds is not None:
                            return fds
                if on_wait is not None and ahead != last_ahead:
                    on_wait(ahead)
                    last_ahead = ahead
                if should_stop():
                    return None
                time.sleep(poll)
        finally:
            ticket.unlink(missing_ok=True)

    def _ahead_of(self, mine: str) -> int:
        ahead = 0
        for name in sorted(os.listdir(self.queue)):
            if name == mine:
                return ahead
            pid = int(name.split("-")[1]) if name.count("-") >= 2 and name.split("-")[1].isdigit() else 0
            if not psutil.pid_exists(pid):  # a launcher that died left its ticket: not in the way
                (self.queue / name).unlink(missing_ok=True)
                continue
            ahead += 1
        return ahead

    def _try_slots(self, n: int) -> list[int] | None:
        got: list[int] = []
        for i in range(self.slots):
            fd = os.open(self.dir / f"slot-{i}", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            got.append(fd)
            if len(got) == n:
                return got
        self.release(got)
        return None

    @staticmethod
    def release(fds: list[int]) -> None:
        for fd in fds:
            try:
                os.close(fd)  # closing drops the flock
            except OSError:
                pass

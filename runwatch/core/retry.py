"""Waiting between tries, in one way: exponential back-off computed by tenacity."""

from __future__ import annotations

import tenacity


class Backoff:
    """Seconds to wait before the next try: `first`, doubling, at most `most`; `reset()` after a success.
    For loops that must not block on a retry (the emitter's connections, the sink's writes)."""

    def __init__(self, first: float = 0.5, most: float = 10.0):
        self._wait = tenacity.wait_exponential(multiplier=first, max=most)
        self.tries = 0

    def next(self) -> float:
        self.tries += 1
        return float(self._wait(_State(self.tries)))

    def reset(self) -> None:
        self.tries = 0


class _State:
    """What tenacity's wait strategies read of a retry state: the number of the attempt."""

    def __init__(self, attempt_number: int):
        self.attempt_number = attempt_number


def retrying(attempts: int, first: float = 0.25, most: float = 5.0) -> tenacity.AsyncRetrying:
    """`async for attempt in retrying(n): with attempt: ...`: up to `attempts` tries, then the last error."""
    return tenacity.AsyncRetrying(stop=tenacity.stop_after_attempt(attempts),
                                  wait=tenacity.wait_exponential(multiplier=first, max=most), reraise=True)

"""The repeat rule, once: which (source, seq) an event stream has already taken.

Every source numbers its events per run and topic from 0 (producers/emitter.py), so what a stage has
taken from one source is normally the prefix 0..hi. A resend after a broker restart can arrive after
newer events; those are kept as `extra` until the prefix reaches them. Every stage that drops repeats
(the processors, the sink, the live tail) asks a `Seen`; gaps are what the prefix never reached.
"""

from __future__ import annotations

from typing import Any

#: Out-of-order sequence numbers kept per source; past this the prefix is moved up to the oldest of them
#: (what lies below stays a gap, counted where the store is read).
MAX_EXTRA = 4096


class SeqSet:
    """The sequence numbers taken from one source: the prefix 0..hi, and the ones above it."""

    __slots__ = ("hi", "extra")

    def __init__(self, hi: int = -1, extra: set[int] | None = None):
        self.hi = hi
        self.extra: set[int] = extra or set()

    def __contains__(self, seq: int) -> bool:
        return seq <= self.hi or seq in self.extra

    def add(self, seq: int) -> bool:
        """Record `seq`; False when it was taken already (a repeat)."""
        if seq in self:
            return False
        if seq == self.hi + 1:
            self.hi = seq
        else:
            self.extra.add(seq)
            if len(self.extra) <= MAX_EXTRA:
                return True
            self.hi = min(self.extra)
            self.extra.discard(self.hi)
        while self.hi + 1 in self.extra:
            self.hi += 1
            self.extra.discard(self.hi)
        return True

    @property
    def holes(self) -> int:
        """Sequence numbers below the highest taken that were never taken (yet)."""
        return (max(self.extra) - self.hi - len(self.extra)) if self.extra else 0

    def to_wire(self) -> list[Any]:
        return [self.hi, sorted(self.extra)] if self.extra else [self.hi]

    @classmethod
    def from_wire(cls, value: Any) -> "SeqSet":
        if isinstance(value, int):  # a snapshot written before sets: the highest seq taken
            return cls(value)
        return cls(int(value[0]), set(value[1]) if len(value) > 1 else None)

    @classmethod
    def from_stored(cls, seqs: list[int]) -> "SeqSet":
        s = cls()
        for q in sorted(seqs):
            s.add(int(q))
        return s

    def __repr__(self) -> str:
        return f"SeqSet(hi={self.hi}, extra={sorted(self.extra)})"


class Seen:
    """{key: SeqSet}: what a stage has taken, per (whatever names a stream: run, source, topic)."""

    __slots__ = ("sets",)

    def __init__(self, sets: dict | None = None):
        self.sets: dict[Any, SeqSet] = sets if sets is not None else {}

    def is_repeat(self, key: Any, seq: int) -> bool:
        """True when (key, seq) was taken already; records it otherwise."""
        s = self.sets.get(key)
        if s is None:
            s = self.sets[key] = SeqSet()
        return not s.add(seq)

    def has(self, key: Any, seq: int) -> bool:
        s = self.sets.get(key)
        return s is not None and seq in s

    def __contains__(self, key: Any) -> bool:
        return key in self.sets

    def holes(self) -> int:
        return sum(s.holes for s in self.sets.values())

    def to_wire(self) -> dict[str, Any]:
        return {str(k): s.to_wire() for k, s in self.sets.items()}

    @classmethod
    def from_wire(cls, value: dict[str, Any] | None) -> "Seen":
        return cls({k: SeqSet.from_wire(v) for k, v in (value or {}).items()})

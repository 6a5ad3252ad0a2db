"""Read-your-writes: what this process wrote, laid over what the store says until the store has it.

Every write goes through the broker, the processors and the sink before the read API shows it (about
0.15 s on the embedded stack). A read through the SDK must show every write the same process made
before it, without a sleep or a retry in the user's code (docs/architecture.md, "Read-your-writes"):

- a run's record (status, tags, properties, its children, whether it exists at all): the SDK keeps what
  this process wrote of each run (`Written`). The stored record names what of each source's events it
  was built from (`seen`); while it lacks this process's last write, the process's own writes are laid
  over it (`overlay`), and runs it lacks entirely are added from what was written (`local_rows`);
- a run's metrics: the read carries the seq of this process's last metric batch of the run, and the
  read API answers once that batch is stored (`metrics_token`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from runwatch.core.seqs import SeqSet
from runwatch.core.states import TERMINAL

#: Runs whose writes this process remembers (the oldest are forgotten past it).
MAX_RUNS = 10_000


@dataclass
class Written:
    run_id: str
    experiment: str
    parent_run_id: str | None
    run_type: str
    compute_target: str
    display_name: str | None
    created_ts: float
    description: str | None = None
    #: set here (None: this process never set it; its launcher or another process owns it)
    status: str | None = None
    status_ts: float | None = None
    error: dict[str, Any] | None = None
    tags: dict[str, str | None] = field(default_factory=dict)
    removed_tags: set[str] = field(default_factory=set)
    properties: dict[str, str] = field(default_factory=dict)
    #: created here (not merely reopened): a store without it has not caught up yet
    created_here: bool = True
    #: the seq of this process's last write of the run that a stored record was seen to hold (-1: none yet)
    stored_seq: int = -1

    def row(self) -> dict[str, Any]:
        """The run as the read API would give it, from what this process wrote."""
        start = _iso(self.created_ts)
        end = _iso(self.status_ts) if self.status in TERMINAL else None
        return {"run_id": self.run_id, "experiment": self.experiment, "display_name": self.display_name,
                "description": self.description,
                "parent_run_id": self.parent_run_id, "run_type": self.run_type, "compute_target": self.compute_target,
                "status": self.status or "NotStarted", "created_time": start, "start_time": start, "end_time": end,
                "duration_s": (self.status_ts - self.created_ts) if end else None,
                "properties": dict(self.properties), "tags": dict(self.tags), "error": self.error, "dropped_points": 0,
                "illegal_transitions": 0, "version": 0, "seen": {}}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


_RUNS: "OrderedDict[str, Written]" = OrderedDict()
_LOCK = threading.Lock()


def remember(w: Written) -> Written:
    with _LOCK:
        _RUNS[w.run_id] = w
        _RUNS.move_to_end(w.run_id)
        while len(_RUNS) > MAX_RUNS:
            _RUNS.popitem(last=False)
    return w


def written(run_id: str) -> Written | None:
    return _RUNS.get(run_id)


def stored_has(row: dict[str, Any] | None, source: str, seq: int) -> bool:
    """Whether a stored record was built from this source's event `seq` (and so from all it wrote before)."""
    if seq < 0:
        return True
    if row is None:
        return False
    wire = (row.get("seen") or {}).get(source)
    return wire is not None and seq in SeqSet.from_wire(wire)


def overlay(row: dict[str, Any] | None, w: Written | None, source: str, last_seq: int) -> dict[str, Any] | None:
    """The stored record of a run, with this process's writes laid over it while the store lacks them."""
    if w is None:
        return row
    if stored_has(row, source, last_seq):
        w.stored_seq = max(w.stored_seq, last_seq)
        return row
    if row is None and not w.created_here:
        return None
    merged = dict(row) if row is not None else w.row()
    merged["tags"] = {k: v for k, v in {**(merged.get("tags") or {}), **w.tags}.items() if k not in w.removed_tags}
    merged["properties"] = {**w.properties, **(merged.get("properties") or {})}
    if w.display_name is not None:
        merged["display_name"] = w.display_name
    if w.description is not None:
        merged["description"] = w.description
    if w.status is not None and merged.get("status") not in TERMINAL:
        merged["status"] = w.status
        if w.error is not None:
            merged["error"] = w.error
        if w.status in TERMINAL and not merged.get("end_time"):
            merged["end_time"] = _iso(w.status_ts)
    return merged


def unconfirmed(mine: list[Written], last_seq) -> list[Written]:
    """The runs among `mine` whose last write (`last_seq(run_id)`) no stored record was seen to hold yet:
    only these need to be looked up and laid over; the others the store answers for alone."""
    return [w for w in mine if w.stored_seq < last_seq(w.run_id)]


def local_rows(experiment: str | None = None, parent: str | None = None) -> list[Written]:
    with _LOCK:
        return [w for w in _RUNS.values() if w.created_here and (experiment is None or w.experiment == experiment)
                and (parent is None or w.parent_run_id == parent)]


def matches(row: dict[str, Any], tags: list[str] | None, properties: list[str] | None, run_type: str | None,
            include_children: bool, status: list[str] | None = None) -> bool:
    """The read API's run filters (runwatch/api/queries.py), on one run's record."""
    def has(m: dict, items: list[str] | None) -> bool:
        for item in items or []:
            k, eq, v = item.partition("=")
            if k not in m or (eq and (m[k] or "") != v):
                return False
        return True

    return (has(row.get("tags") or {}, tags) and has(row.get("properties") or {}, properties)
            and (run_type is None or row.get("run_type") == run_type)
            and (include_children or not row.get("parent_run_id"))
            and (not status or row.get("status") in status))


def now() -> float:
    return time.time()


__all__ = ["Written", "remember", "written", "overlay", "local_rows", "unconfirmed", "matches", "stored_has"]

"""The aggregates' check: finished runs' running aggregates against their stored points, recomputed from the
points when they fell short (the processors may skip a batch after a crash: Faust acknowledges what it
could not finish). The points are the truth; the recomputation is the processors' own definition
(runwatch/core/aggregates.py), run over the stored points."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from runwatch.core import aggregates as agg
from runwatch.core.settings import Settings

from .rows import TS
from .store import DB, ClickHouseStore

log = logging.getLogger("runwatch.sink")

#: Checks of one run before it is given up (the sink still behind its aggregates each time).
MAX_TRIES = 5


def stored_aggregates(store: ClickHouseStore, run_id: str) -> tuple[dict[str, list], dict[str, dict], int]:
    """A run's aggregates computed from its stored points: (state rows by metric key, what each source's
    events are stored as {src: [seqs]}, the highest stored version). What the processors reload after a
    restart of the broker, and what the repair writes."""
    rows = store.query(f"""
        SELECT name, column, toString(kind), step, toUnixTimestamp64Micro(ts), seq, value, dtype = 'str', text, src
        FROM {DB}.metric_points WHERE run_id = {{r:String}}""", r=run_id)
    version = store.query(f"SELECT max(version) FROM {DB}.metric_aggregates WHERE run_id = {{r:String}}", r=run_id)
    seqs: dict[str, set[int]] = {}
    if not rows:
        return {}, {}, int(version[0][0] or 0) if version else 0
    keys: list[str] = []
    kinds: list[str] = []
    key_ids: dict[str, int] = {}
    kid = np.empty(len(rows), np.int64)
    for i, r in enumerate(rows):
        k = agg.metric_key(r[0], r[1])
        j = key_ids.get(k)
        if j is None:
            j = key_ids[k] = len(keys)
            keys.append(k)
            kinds.append(r[2])
        kid[i] = j
        seqs.setdefault(r[9], set()).add(int(r[5]))
    cols = list(zip(*rows))
    texts = [t if is_text else None for is_text, t in zip(cols[7], cols[8])]
    state = agg.aggregate(keys, kinds, kid, np.array(cols[3], np.int64), np.array(cols[4], np.int64),
                          np.array(cols[5], np.int64), np.array(cols[6], np.float64),
                          texts if any(cols[7]) else None)
    return state, {src: sorted(s) for src, s in seqs.items()}, int(version[0][0] or 0)


@dataclass
class AggregatesCheck:
    """Finished runs waiting for their check: run_id -> (when, tries)."""

    store: ClickHouseStore
    settings: Settings
    due: dict[str, tuple[float, int]] = field(default_factory=dict)
    checked: int = 0
    repaired: int = 0

    def add(self, run_ids: list[str]) -> None:
        when = time.time() + self.settings.aggregates_check_delay
        for run_id in run_ids:
            self.due.setdefault(run_id, (when, 0))

    def pending(self, now: float) -> bool:
        return bool(self.due) and min(d for d, _ in self.due.values()) <= now

    def run_safely(self) -> None:
        """A check that fails must never hold up the stream: the runs are looked at again later."""
        try:
            self.run()
        except Exception as exc:
            log.warning("runwatch sink: checking finished runs' aggregates failed (%s: %s); trying again later",
                        type(exc).__name__, exc)
            later = time.time() + self.settings.aggregates_check_delay
            self.due = {r: (max(when, later), tries + 1) for r, (when, tries) in self.due.items() if tries < MAX_TRIES}

    def run(self) -> None:
        """Compare each due run's aggregate counts with its stored points; recompute a shortfall from the
        points. More counted than stored means the sink is still behind: the run is looked at again later."""
        now = time.time()
        due = [r for r, (when, _) in self.due.items() if when <= now]
        if not due:
            return
        # one thread: the check counts every point of the runs (10 M for 1,000 runs of 10,000 points) and
        # is never in a hurry; the other core stays with the read API's queries and the pipeline
        rows = self.store.query(f"""
            SELECT p.run_id, p.name, p.column, p.n, a.count
            FROM (SELECT run_id, name, column, count() AS n FROM {DB}.metric_points
                  WHERE run_id IN {{runs:Array(String)}} GROUP BY run_id, name, column) AS p
            LEFT JOIN (SELECT run_id, name, column, count FROM {DB}.metric_aggregates FINAL
                       WHERE run_id IN {{runs:Array(String)}}) AS a USING (run_id, name, column)
            SETTINGS join_use_nulls = 1, max_threads = 1""", runs=due)
        short: dict[str, set[str]] = {}
        for run_id, name, column, n, count in rows:
            if count is None or n > count:
                short.setdefault(run_id, set()).add(agg.metric_key(name, column))
        behind = {r[0] for r in rows if r[4] is not None and r[3] < r[4]}
        self.checked += len(due)
        for run_id, keys in sorted(short.items()):
            self._recompute(run_id, keys)
        if short:
            self.repaired += len(short)
            log.warning("runwatch sink: the running aggregates of %d finished run(s) fell short of their stored "
                        "points (a batch skipped after a crash); recomputed from the points: %s",
                        len(short), ", ".join(sorted(short)[:10]))
        for run_id in due:
            _, tries = self.due.pop(run_id)
            if run_id in behind and tries < MAX_TRIES:  # the sink has not stored every point yet: look again later
                self.due[run_id] = (now + self.settings.aggregates_check_delay, tries + 1)

    def _recompute(self, run_id: str, keys: set[str]) -> None:
        state, _, version = stored_aggregates(self.store, run_id)
        experiment = self.store.query(f"SELECT any(experiment) FROM {DB}.metric_points WHERE run_id = {{r:String}}",
                                      r=run_id)[0][0]
        rows = agg.to_rows(state, sorted(k for k in keys if k in state))
        if not rows:
            return
        cols = {c: [r[c] for r in rows] for c in rows[0]}
        self.store.insert("metric_aggregates", pa.table({
            "run_id": pa.array([run_id] * len(rows)), "experiment": pa.array([experiment] * len(rows)),
            "name": pa.array(cols["name"]), "column": pa.array(cols["column"]), "kind": pa.array(cols["kind"]),
            "count": pa.array(cols["count"], pa.uint64()), "min": pa.array(cols["min"], pa.float64()),
            "max": pa.array(cols["max"], pa.float64()), "first": pa.array(cols["first"], pa.float64()),
            "last": pa.array(cols["last"], pa.float64()), "last_text": pa.array(cols["last_text"], pa.string()),
            "last_step": pa.array(cols["last_step"], pa.int64()),
            "last_ts": pa.array(cols["last_ts"], pa.int64()).cast(TS),
            "version": pa.array([version + 1] * len(rows), pa.uint64())}))


__all__ = ["AggregatesCheck", "stored_aggregates"]

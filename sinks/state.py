"""What the store says of a run's processor state, for the processors to start from after a restart.

The embedded broker keeps its topics in memory, Faust's changelogs among them: after it restarts, the
processors' tables are empty. A run they meet again is reloaded from the store: its state as the last
stored snapshot says (with what of each source it was built from), and its running aggregates computed
from its stored points (with what of each source they hold). Events stored since are then repeats;
events not stored are applied once.
"""

from __future__ import annotations

import json
import time
from typing import Any

from runwatch.core.seqs import SeqSet

from .repair import stored_aggregates
from .store import DB, ClickHouseStore


class StoredState:
    def __init__(self, store: ClickHouseStore):
        self.store = store
        self._known: set[str] | None = None

    def known(self) -> set[str]:
        """Every run the store knows (asked once): a run not among them is new, and needs no lookup."""
        if self._known is None:
            self._known = {r for (r,) in self.store.query(
                f"SELECT run_id FROM {DB}.runs UNION DISTINCT SELECT DISTINCT run_id FROM {DB}.metric_aggregates")}
        return self._known

    def run_state(self, run_id: str) -> dict[str, Any] | None:
        """The processors' run state as last stored (the shape of RunStateLogic.new_state), or None."""
        if run_id not in self.known():
            return None
        rows = self.store.query(f"""
            SELECT experiment, display_name, description, parent_run_id, run_type, compute_target, status,
                   toUnixTimestamp64Micro(created_time), toUnixTimestamp64Micro(start_time),
                   toUnixTimestamp64Micro(end_time), toJSONString(properties), tags_json, error,
                   toUnixTimestamp64Micro(last_heartbeat), dropped_points, illegal_transitions, version, seen
            FROM {DB}.runs FINAL WHERE run_id = {{r:String}}""", r=run_id)
        if not rows:
            return None
        (experiment, display_name, description, parent, run_type, target, status, created, start, end, props, tags,
         error, heartbeat, dropped, illegal, version, seen) = rows[0]
        s = lambda us: None if us is None else us / 1e6  # noqa: E731
        return {
            "run_id": run_id, "experiment": experiment, "display_name": display_name, "description": description,
            "parent_run_id": parent,
            "run_type": run_type, "compute_target": target, "status": status, "created_ts": s(created),
            "start_ts": s(start), "end_ts": s(end), "properties": json.loads(props or "{}"),
            "tags": json.loads(tags or "{}"), "error": json.loads(error) if error else None,
            "last_heartbeat": s(heartbeat),
            # silence is measured on the worker's clock from when it (re)started: a run is given its
            # heartbeat_timeout from now, whatever happened while the processors were away
            "last_seen": time.time(), "not_responding_since": None, "dropped_points": int(dropped),
            "illegal_transitions": int(illegal), "version": int(version), "seen": json.loads(seen or "{}"),
        }

    def metric_state(self, run_id: str) -> dict[str, Any] | None:
        """The processors' metric state of a run from its stored points (the shape of MetricsLogic.new_state)."""
        if run_id not in self.known():
            return None
        aggs, seqs, version = stored_aggregates(self.store, run_id)
        if not aggs and not version:
            return None
        return {"seen": {src: SeqSet.from_stored(q).to_wire() for src, q in seqs.items()}, "aggs": aggs,
                "version": version}


__all__ = ["StoredState"]

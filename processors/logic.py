"""What the processors do to one event, apart from Faust: aggregates, the run-state machine, alerts."""

from __future__ import annotations

import hashlib
from typing import Any

from runwatch.core import aggregates as agg
from runwatch.core.events import (
    Alert,
    Envelope,
    FileStored,
    Heartbeat,
    LivenessCheck,
    LogBatch,
    MetricAggregates,
    MetricBatch,
    PropertiesSet,
    RunCreated,
    RunState,
    RunStatus,
    RunUpdated,
    StatusChanged,
    TagsSet,
    Transition,
    make_envelope,
)
from runwatch.core.names import DRIVER_LOG_PREFIX
from runwatch.core.seqs import SeqSet
from runwatch.core.states import LIVE

from .states import ALERTING, check_transition, is_terminal

Out = tuple[str, str, Any]  # (topic name without prefix, run_id, envelope)


def derived_id(*parts: str) -> str:
    """A deterministic event id, so a replayed input yields the same output ids (sinks deduplicate on them)."""
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()


def is_repeat(seen: dict[str, Any], env: Envelope) -> bool:
    """True when this (source, seq) was already applied; records it otherwise. `seen` is a state's JSON-able
    {source: SeqSet wire form} (runwatch/core/seqs.py)."""
    key = env.source.key
    taken = SeqSet.from_wire(seen[key]) if key in seen else SeqSet()
    if not taken.add(env.seq):
        return True
    seen[key] = taken.to_wire()
    return False


class Rejected(Exception):
    """An event the processors refuse (it goes to the dlq with this reason); not a processing error."""


class MetricsLogic:
    """Per run: {"seen": {source: seq}, "aggs": {metric key: row}, "version": n}."""

    def __init__(self, max_metric_names: int = 1000):
        self.max_names = max_metric_names

    @staticmethod
    def new_state() -> dict[str, Any]:
        return {"seen": {}, "aggs": {}, "version": 0}

    @staticmethod
    def _rows_event(env: Envelope, state: dict[str, Any], keys: list[str], event_id: str) -> list[Out]:
        """The current rows of `keys`, at the run's current version."""
        rows = agg.to_rows(state["aggs"], keys)
        for r in rows:
            r["version"] = state["version"]
        payload = MetricAggregates(source_event=env.event_id, rows=rows)
        return [("aggregates", env.run_id,
                 make_envelope(env.run_id, env.experiment, payload, state["version"], event_id=event_id))]

    def handle(self, env: Envelope, state: dict[str, Any]) -> list[Out]:
        batch = env.payload
        if not isinstance(batch, MetricBatch):
            return []
        if is_repeat(state["seen"], env):
            # A replay (after a crash, the input offsets lag the table's changelog): the state has this batch,
            # but the aggregates it produced may not have reached the topic. Send the run's current rows
            # again; they carry the same version, so storing them twice changes nothing.
            if not state["version"]:
                return []
            return self._rows_event(env, state, list(state["aggs"]),
                                    derived_id("agg-again", env.run_id, str(state["version"])))
        aggs = state["aggs"]
        if any(agg.metric_key(n.name, n.column) not in aggs for n in batch.names):  # a new name: count them
            names = {agg.split_key(k)[0] for k in aggs} | {n.name for n in batch.names}
            if len(names) > self.max_names:
                raise Rejected(f"run {env.run_id} would have {len(names)} distinct metric names; "
                               f"at most {self.max_names} (max_metric_names): the batch was not aggregated")
        rows = agg.batch_aggregates(batch, env.seq)
        agg.merge(aggs, rows)
        state["version"] += 1
        return self._rows_event(env, state, list(rows), derived_id("agg", env.event_id))


class RunStateLogic:
    """Per run: a snapshot of everything the run-state machine knows (see `new_state`)."""

    @staticmethod
    def check_size(st: dict[str, Any], env: Envelope, limit: int) -> int | None:
        """The characters of the run's tags and properties once `env` is applied, or Rejected when that is more
        than `limit`: the run's state travels as one message, and must never grow past one (docs/architecture.md: no event
        crashes a stage). None for events that do not change them."""
        p = env.payload
        if not isinstance(p, (RunCreated, TagsSet, PropertiesSet)):
            return None
        size = st.get("size")
        if size is None:
            size = (sum(len(k) + len(v or "") for k, v in st["tags"].items())
                    + sum(len(k) + len(v) for k, v in st["properties"].items()))
        for k, v in (p.tags.items() if not isinstance(p, PropertiesSet) else ()):
            if k in st["tags"]:
                size -= len(k) + len(st["tags"][k] or "")
            size += len(k) + len(v or "")
        for k, v in (p.properties.items() if not isinstance(p, TagsSet) else ()):
            if k not in st["properties"]:  # immutable: the first value stays
                size += len(k) + len(v)
        if size > limit:
            raise Rejected(f"{env.kind} event: the run's tags and properties would be {size:,} characters; at most "
                           f"{limit:,} (processor_max_message_bytes / 4): not applied")
        return size

    @staticmethod
    def new_state(run_id: str, experiment: str) -> dict[str, Any]:
        return {
            "run_id": run_id, "experiment": experiment, "display_name": None, "parent_run_id": None,
            "run_type": "interactive", "compute_target": "local", "status": None, "created_ts": None,
            "start_ts": None, "end_ts": None, "properties": {}, "tags": {}, "error": None,
            "last_heartbeat": None, "last_seen": None, "not_responding_since": None, "dropped_points": 0,
            "illegal_transitions": 0, "version": 0, "seen": {}, "description": None,
        }

    def handle(self, env: Envelope, st: dict[str, Any], now: float | None = None,
               tails: dict[str, list[str]] | None = None) -> list[Out]:
        """Apply one `runs` event. `now` is when the worker received it (liveness is judged on the
        worker's clock, not the producer's); `tails` are the last log lines per file, for alerts."""
        if is_repeat(st["seen"], env):
            # a replay: send the current snapshot again (same version), in case the first one was lost
            return [self._resend(st)] if st["version"] else []
        p = env.payload
        out: list[Out] = []
        changed = True
        if env.experiment and not st["experiment"]:
            st["experiment"] = env.experiment
        if isinstance(p, LivenessCheck):
            if st["status"] != p.if_status.value or st.get("last_seen") != p.last_seen:
                return []  # the run spoke (or moved) after the check was written: nothing to do
            error = None
            if p.to_status in (RunStatus.NotResponding, RunStatus.Failed):
                error = {"code": "NotResponding",
                         "message": f"no heartbeat from the run's processes for {p.silent_s:.0f} s"
                                    + ("; declared Failed" if p.to_status == RunStatus.Failed else "")}
            out += self._move(env, st, p.to_status, error, at=env.ts, tails=tails)
            if p.to_status == RunStatus.NotResponding:
                st["not_responding_since"] = env.ts
            return out + [self.snapshot(env, st)] if out else []
        st["last_seen"] = now if now is not None else env.ts
        if isinstance(p, RunCreated):
            st["display_name"] = p.display_name
            st["parent_run_id"] = p.parent_run_id
            st["run_type"] = p.run_type
            st["compute_target"] = p.compute_target
            st["created_ts"] = st["created_ts"] or p.created_ts
            for k, v in p.properties.items():
                st["properties"].setdefault(k, v)
            st["tags"].update(p.tags)
            out += self._move(env, st, p.status, None, at=p.created_ts, tails=tails)
        elif isinstance(p, StatusChanged):
            out += self._move(env, st, p.status, p.error, at=env.ts, tails=tails)
        elif isinstance(p, TagsSet):
            st["tags"].update(p.tags)
            for k in p.removed:
                st["tags"].pop(k, None)
        elif isinstance(p, RunUpdated):
            if p.display_name is not None:
                st["display_name"] = p.display_name
            if p.description is not None:
                st["description"] = p.description
        elif isinstance(p, PropertiesSet):
            for k, v in p.properties.items():  # immutable: the first value stays
                st["properties"].setdefault(k, v)
        elif isinstance(p, FileStored):
            # the run's file list is stored by the sink, which reads `aggregates`, not `runs`
            st["files"] = st.get("files", 0) + 1
            out.append(("aggregates", env.run_id, make_envelope(env.run_id, st["experiment"], p, env.seq,
                                                                event_id=derived_id("file", env.event_id))))
        elif isinstance(p, Heartbeat):
            changed = p.dropped != st["dropped_points"]
            st["last_heartbeat"] = env.ts
            st["dropped_points"] = max(st["dropped_points"], p.dropped)
            if st["status"] == RunStatus.NotResponding.value:
                out += self._move(env, st, RunStatus.Running, None, at=env.ts)
                changed = True
        else:
            return []
        if st["created_ts"] is None:
            st["created_ts"] = env.ts
        if changed or out:
            out.append(self.snapshot(env, st))
        return out

    @staticmethod
    def _state_event(st: dict[str, Any], event_id: str) -> Out:
        # the snapshot carries `seen` too: the sink stores it, and the processors reload it after a restart
        return ("aggregates", st["run_id"],
                make_envelope(st["run_id"], st["experiment"], RunState(version=st["version"], snapshot=dict(st)),
                              st["version"], event_id=event_id))

    def _resend(self, st: dict[str, Any]) -> Out:
        return self._state_event(st, derived_id("state-again", st["run_id"], str(st["version"])))

    def snapshot(self, env: Envelope, st: dict[str, Any]) -> Out:
        st["version"] += 1
        return self._state_event(st, derived_id("state", st["run_id"], str(st["version"]), env.event_id))

    def _move(self, env: Envelope, st: dict[str, Any], target: RunStatus, error: Any, at: float,
              tails: dict[str, list[str]] | None = None) -> list[Out]:
        current = RunStatus(st["status"]) if st["status"] else None
        ok, reason = check_transition(current, target)
        out: list[Out] = []
        if current == target:
            return out
        tr = Transition(from_status=current, to_status=target, applied=ok, reason=reason, source_event=env.event_id)
        out.append(("aggregates", env.run_id,
                    make_envelope(env.run_id, st["experiment"], tr, env.seq, event_id=derived_id("tr", env.event_id))))
        if not ok:
            st["illegal_transitions"] += 1
            return out
        st["status"] = target.value
        if target == RunStatus.Running and st["start_ts"] is None:
            st["start_ts"] = at
        if is_terminal(target):
            st["end_ts"] = at
            if st["start_ts"] is None:
                st["start_ts"] = st["created_ts"] or at
        if error:
            st["error"] = error
        if target in ALERTING:
            alert = Alert(status=target, reason=(error or {}).get("message") or f"run became {target.value}",
                          details={"error": error, "parent_run_id": st["parent_run_id"],
                                   "compute_target": st["compute_target"], "log_tail": tails or {}})
            out.append(("alerts", env.run_id, make_envelope(env.run_id, st["experiment"], alert, env.seq,
                                                           event_id=derived_id("alert", env.event_id))))
        return out


    @staticmethod
    def liveness_check(st: dict[str, Any], now: float, since: float, heartbeat_timeout: float,
                       not_responding_timeout: float) -> LivenessCheck | None:
        """The check a timer should write for this run now, if any. `since`: when this worker started
        (a worker that was away has not heard anyone, which says nothing about the runs)."""
        status, seen = st.get("status"), st.get("last_seen")
        if seen is None:
            return None
        silent = now - max(seen, since)
        if status in LIVE and silent > heartbeat_timeout:
            return LivenessCheck(if_status=RunStatus(status), to_status=RunStatus.NotResponding, last_seen=seen,
                                 silent_s=now - seen)
        if status == RunStatus.CancelRequested.value and silent > heartbeat_timeout:
            # nobody is left to carry out the cancel: it is done
            return LivenessCheck(if_status=RunStatus.CancelRequested, to_status=RunStatus.Canceled, last_seen=seen,
                                 silent_s=now - seen)
        if status == RunStatus.NotResponding.value:
            entered = max(st.get("not_responding_since") or seen, since)
            if now - entered > not_responding_timeout:
                return LivenessCheck(if_status=RunStatus.NotResponding, to_status=RunStatus.Failed, last_seen=seen,
                                     silent_s=now - seen)
        return None


#: Log files whose last lines go into alerts.
TAIL_LINES = 10


def update_tails(tails: dict[str, list[str]], batch: LogBatch) -> bool:
    """Keep the last TAIL_LINES lines of each driver log; True when something changed."""
    if not batch.file.startswith(DRIVER_LOG_PREFIX) or not batch.lines:
        return False
    kept = tails.get(batch.file, []) + [ln[:500] for ln in batch.lines[-TAIL_LINES:]]
    tails[batch.file] = kept[-TAIL_LINES:]
    return True


__all__ = ["MetricsLogic", "Rejected", "RunStateLogic", "derived_id", "is_repeat", "update_tails"]

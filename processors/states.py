"""The run-state machine: Azure ML's states and the one table of legal transitions."""

from __future__ import annotations

from runwatch.core.states import TERMINAL, RunStatus, is_terminal

S = RunStatus

#: current state -> states it may move to. Moving to the state a run is already in is a
#: no-op, not an error. Terminal states (Completed, Failed, Canceled) go nowhere.
#: NotResponding is entered when heartbeats stop; a heartbeat brings the run back to Running.
TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    S.NotStarted: frozenset({S.Queued, S.Preparing, S.Starting, S.Running, S.CancelRequested, S.Canceled, S.Failed}),
    S.Queued: frozenset({S.Preparing, S.Starting, S.Running, S.CancelRequested, S.Canceled, S.Failed}),
    S.Preparing: frozenset({S.Starting, S.Running, S.CancelRequested, S.Canceled, S.Failed}),
    S.Starting: frozenset({S.Running, S.CancelRequested, S.Canceled, S.Failed}),
    S.Running: frozenset({S.Finalizing, S.Completed, S.Failed, S.CancelRequested, S.Canceled, S.NotResponding}),
    S.Finalizing: frozenset({S.Completed, S.Failed, S.Canceled, S.NotResponding}),
    S.CancelRequested: frozenset({S.Canceled, S.Failed}),
    S.NotResponding: frozenset({S.Running, S.Finalizing, S.Completed, S.Failed, S.Canceled}),
    S.Completed: frozenset(),
    S.Failed: frozenset(),
    S.Canceled: frozenset(),
}

#: States that raise an alert when entered.
ALERTING = frozenset({S.Failed, S.NotResponding})


def check_transition(current: RunStatus | None, target: RunStatus) -> tuple[bool, str]:
    """(allowed, reason). `current` None means the run is not known yet (it starts NotStarted)."""
    here = current or S.NotStarted
    if here == target:
        return True, "no change"
    if target in TRANSITIONS[here]:
        return True, ""
    if here in TERMINAL:
        return False, f"{here.value} is final; {target.value} was not applied"
    return False, f"{here.value} -> {target.value} is not a legal transition"


__all__ = ["TRANSITIONS", "ALERTING", "check_transition", "is_terminal"]

"""Azure ML's run states and the sets of them every stage asks about (the transition table is the
processors', in processors/states.py)."""

from __future__ import annotations

import enum


class RunStatus(str, enum.Enum):
    """Azure ML's run states."""

    NotStarted = "NotStarted"
    Queued = "Queued"
    Preparing = "Preparing"
    Starting = "Starting"
    Running = "Running"
    Finalizing = "Finalizing"
    CancelRequested = "CancelRequested"
    Completed = "Completed"
    Failed = "Failed"
    Canceled = "Canceled"
    NotResponding = "NotResponding"


S = RunStatus
#: Every state, in the order a run goes through them.
ALL: tuple[str, ...] = tuple(s.value for s in RunStatus)
#: A run in one of these is over: nothing moves it again. (Sets of the values; a RunStatus compares equal.)
TERMINAL: frozenset[str] = frozenset({S.Completed.value, S.Failed.value, S.Canceled.value})
#: Not over yet: a submitted run in one of these holds (or waits for) its compute slots.
ACTIVE: frozenset[str] = frozenset(ALL) - TERMINAL
#: No output can have come yet.
WAITING: frozenset[str] = frozenset({S.NotStarted.value, S.Queued.value})
#: The run's processes must be sending heartbeats.
LIVE: frozenset[str] = frozenset({S.Running.value, S.Finalizing.value})


def is_terminal(status: str | RunStatus | None) -> bool:
    return status is not None and str(getattr(status, "value", status)) in TERMINAL


def sql_list(states) -> str:
    """The states as a SQL list literal: ('A', 'B'), in the order of ALL."""
    return "(" + ", ".join(f"'{s}'" for s in ALL if s in states) + ")"

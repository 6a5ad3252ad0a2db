"""The stream processors: running aggregates, the run-state machine, alerts (Faust)."""

from .states import TRANSITIONS, check_transition

__all__ = ["TRANSITIONS", "check_transition"]

"""What the SDK accepts, checked at the call that passes it: every value accepted is stored and read back
exactly, everything else is refused here with the SDK's own error naming the argument and the limit.
The limits are in one table, docs/limits.md, and in the settings (runwatch/core/settings.py).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from runwatch.core.errors import RunwatchError
from runwatch.core.events import DType

_FLOAT, _INT, _BOOL, _STR = DType.float, DType.int, DType.bool, DType.str
#: Integers are stored as float64, exactly up to 2**53 in magnitude; steps likewise.
MAX_EXACT_INT = 1 << 53
#: Characters of a string metric value.
MAX_TEXT_VALUE = 65_536


class MetricError(RunwatchError, ValueError):
    """A value, name or shape that cannot be logged; raised at the call that passed it."""


class MetricTypeError(RunwatchError, TypeError):
    """A value of a type that cannot be logged; raised at the call that passed it."""


def check_text(text: str, call: str, arg: str) -> str:
    """`text` as it will be stored: it must be encodable as UTF-8 (a lone surrogate is not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MetricError(f"{call}: {arg} cannot be stored: {exc.reason} at position {exc.start} "
                          f"({text[exc.start:exc.end]!r}); give text that is valid Unicode") from None
    return text


def _exact_int(v: int, call: str, arg: str) -> float:
    if -MAX_EXACT_INT <= v <= MAX_EXACT_INT:
        return float(v)
    raise MetricError(f"{call}: {arg} {v} is outside ±{MAX_EXACT_INT:,} (2**53), the integers runwatch stores "
                      "exactly; log it as a float or a string")


def coerce(value: Any, call: str, arg: str = "value") -> tuple[DType, Any]:
    """(dtype, the value as stored: a float, or a str) for a value `log` and its kin take."""
    t = type(value)
    if t is float:
        return _FLOAT, value
    if t is int:
        return _INT, _exact_int(value, call, arg)
    if t is bool:
        return _BOOL, float(value)
    if t is str:
        if len(value) > MAX_TEXT_VALUE:
            raise MetricError(f"{call}: {arg} is a string of {len(value):,} characters; at most {MAX_TEXT_VALUE:,}")
        return _STR, check_text(value, call, arg)
    if isinstance(value, np.generic):
        if isinstance(value, np.bool_):
            return _BOOL, float(value)
        if isinstance(value, np.integer):
            return _INT, _exact_int(int(value), call, arg)
        if isinstance(value, np.floating):
            return _FLOAT, float(value)
        if isinstance(value, np.str_):
            return coerce(str(value), call, arg)
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return _INT, _exact_int(int(value), call, arg)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        try:
            return _FLOAT, float(value)
        except (OverflowError, ValueError) as exc:
            raise MetricError(f"{call}: {arg} {value!r:.60} does not fit a float64 ({exc})") from None
    if value is None:
        raise MetricTypeError(f"{call}: {arg} is None; log a number, a bool or a string")
    raise MetricTypeError(
        f"{call}: {arg} must be a number, a bool or a string, not {type(value).__name__}"
        + (" (use log_list for a sequence)" if isinstance(value, (list, tuple, np.ndarray)) else ""))


def numeric_array(values: np.ndarray, call: str, arg: str) -> tuple[DType, np.ndarray] | None:
    """A numeric numpy array as (dtype, float64 values), checked; None for an array of another kind."""
    kind = values.dtype.kind
    if kind not in "biuf":
        return None
    if kind in "iu" and len(values):
        lo, hi = int(values.min()), int(values.max())
        if lo < -MAX_EXACT_INT or hi > MAX_EXACT_INT:
            bad = lo if lo < -MAX_EXACT_INT else hi
            raise MetricError(f"{call}: {arg} holds {bad}, outside ±{MAX_EXACT_INT:,} (2**53), the integers runwatch "
                              "stores exactly")
    dtype = {"b": _BOOL, "i": _INT, "u": _INT, "f": _FLOAT}[kind]
    return dtype, values.astype(np.float64)


def check_step(step: Any, call: str) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise MetricTypeError(f"{call}: step must be an integer, not {type(step).__name__}")
    s = int(step)
    if not -MAX_EXACT_INT <= s <= MAX_EXACT_INT:
        raise MetricError(f"{call}: step {s} is outside ±{MAX_EXACT_INT:,} (2**53)")
    return s


def check_name(name: Any, call: str, max_length: int, what: str = "name") -> str:
    if not isinstance(name, str):
        raise MetricTypeError(f"{call}: {what} must be a string, not {type(name).__name__}")
    if not name or not name.strip():
        raise MetricError(f"{call}: {what} is empty")
    if len(name) > max_length:
        raise MetricError(f"{call}: {what} is {len(name):,} characters long; at most {max_length:,}")
    if "\x00" in name:
        raise MetricError(f"{call}: {what} contains a NUL character")
    return check_text(name, call, what)


def materialise(value: Any, call: str, arg: str = "value") -> list | np.ndarray:
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise MetricError(f"{call}: {arg} must be one-dimensional, not of shape {value.shape}")
        return value
    if isinstance(value, (str, bytes)) or value is None or not isinstance(value, Iterable):
        raise MetricTypeError(f"{call}: {arg} must be an iterable of values, not {type(value).__name__}")
    return list(value)


def table_columns(value: Any, call: str, max_length: int) -> dict[str, list | np.ndarray]:
    """log_table's columns: names are strings (never folded together), columns of one length."""
    if not isinstance(value, Mapping) or not value:
        raise MetricTypeError(f"{call}: value must be a non-empty dict of column name -> list of values")
    columns: dict[str, list | np.ndarray] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise MetricTypeError(f"{call}: column names must be strings, not {type(k).__name__} ({k!r:.40})")
        check_name(k, call, max_length, f"column name {k!r:.40}")
        columns[k] = materialise(v, call, f"column {k!r}")
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise MetricError(f"{call}: columns differ in length: {lengths}")
    return columns


class Limits:
    """Tags and properties: how many, how long, and all of a run's together (a run's state travels as one
    message: too much of it would not fit, docs/limits.md)."""

    def __init__(self, settings):
        self.name = settings.max_tag_name_length
        self.value = settings.max_tag_value_length
        self.count = settings.max_tags
        self.total = settings.max_tags_bytes

    def _text(self, v: Any, call: str, arg: str) -> str:
        if isinstance(v, str):
            s = v
        elif isinstance(v, (bool, np.bool_)) or isinstance(v, (int, float, np.generic)):
            if isinstance(v, float) and not math.isfinite(v):
                s = str(v)
            else:
                s = str(v.item() if isinstance(v, np.generic) else v)
        else:
            raise MetricTypeError(f"{call}: {arg} must be a string, not {type(v).__name__}")
        if len(s) > self.value:
            raise MetricError(f"{call}: {arg} is {len(s):,} characters long; at most {self.value:,} "
                              "(setting max_tag_value_length)")
        return check_text(s, call, arg)

    def tags(self, tags: Any, call: str = "tags") -> dict[str, str | None]:
        if not isinstance(tags, Mapping):
            raise MetricTypeError(f"{call}: tags must be a dict, not {type(tags).__name__}")
        out: dict[str, str | None] = {}
        for k, v in tags.items():
            key = check_name(k, call, self.name, "tag name") if isinstance(k, str) else None
            if key is None:
                raise MetricError(f"{call}: tag name must be a non-empty string, not {k!r:.60}")
            out[key] = None if v is None else self._text(v, call, f"tag {k!r:.60}")
        return out

    def properties(self, values: Any, call: str = "properties") -> dict[str, str]:
        if not isinstance(values, Mapping):
            raise MetricTypeError(f"{call}: properties must be a dict, not {type(values).__name__}")
        out = {}
        for k, v in values.items():
            if not isinstance(k, str) or not k:
                raise MetricError(f"{call}: name must be a non-empty string, not {k!r:.60}")
            check_name(k, call, self.name, "property name")
            if v is None or isinstance(v, (list, dict, tuple, set)):
                raise MetricTypeError(f"{call}: {k!r:.60} must be a string, not {type(v).__name__}")
            out[k] = self._text(v, call, f"property {k!r:.60}")
        return out

    @staticmethod
    def size(tags: Mapping[str, str | None], properties: Mapping[str, str]) -> int:
        return sum(len(k) + len(v or "") for k, v in tags.items()) + sum(len(k) + len(v) for k, v in properties.items())

    @staticmethod
    def delta(current: Mapping[str, str | None], changed: Mapping[str, str | None]) -> int:
        """How many characters `changed` adds to a map (`current`) of names and values."""
        return sum(len(k) + len(v or "") - (len(k) + len(current[k] or "") if k in current else 0)
                   for k, v in changed.items())

    def check_run(self, n_tags: int, n_properties: int, size: int, call: str) -> None:
        """A run's tags and properties together, once a change is applied: how many, and their characters."""
        if n_tags > self.count:
            raise MetricError(f"{call}: the run would have {n_tags:,} tags; at most {self.count:,} (setting max_tags)")
        if n_properties > self.count:
            raise MetricError(f"{call}: the run would have {n_properties:,} properties; at most {self.count:,} "
                              "(setting max_tags)")
        if size > self.total:
            raise MetricError(f"{call}: the run's tags and properties would be {size:,} characters in all; at most "
                              f"{self.total:,} (setting max_tags_bytes)")


def filter_param(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [f"{k}={v}" if v is not None else str(k) for k, v in value.items()]
    return [str(v) for v in value]


__all__ = ["MetricError", "MetricTypeError", "coerce", "check_step", "check_name", "check_text", "materialise",
           "numeric_array", "table_columns", "Limits", "filter_param", "MAX_EXACT_INT", "MAX_TEXT_VALUE"]

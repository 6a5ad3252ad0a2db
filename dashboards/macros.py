"""What Grafana and the ClickHouse plugin do to a panel's SQL before ClickHouse sees it, step for step.

1. The plugin's front end replaces `$__conditionalAll(condition, $var)` by `condition`, or by
   `1=1` when `$var` is All (`$__all`) or empty.
2. Grafana replaces template variables (`$var`, `${var}`, `${var:fmt}`, `[[var]]`); the plugin's
   format joins a multi-value selection as `'a','b'` and leaves a single value as it is.
   All (without a custom all value) stands for every option.
3. The plugin's back end expands its macros: `$__timeFilter(col)`, `$__timeFilter_ms(col)`,
   `$__dateFilter(col)`, `$__dateTimeFilter(d, t)` (and `$__dt`), `$__timeInterval(col)`,
   `$__timeInterval_ms(col)`, `$__interval_s`, `$__fromTime`, `$__toTime`, `$__fromTime_ms`,
   `$__toTime_ms`: a macro name ends at a word boundary, its arguments are the text inside
   balanced parentheses split at commas and trimmed.

The tests run every panel's SQL through `expand()` and then on chDB.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

ALL = "$__all"


@dataclass
class Variable:
    """A template variable's current selection and its options (what All stands for)."""

    current: Any               # a string, a list of strings, or ALL
    options: list[str] = field(default_factory=list)


class MacroError(ValueError):
    pass


def _macro_args(sql: str, open_at: int) -> tuple[list[str], int]:
    """Arguments of the macro whose '(' is at `open_at`, and the index after its ')'."""
    depth = 0
    for i in range(open_at, len(sql)):
        if sql[i] == "(":
            depth += 1
        elif sql[i] == ")":
            depth -= 1
            if depth == 0:
                inner = sql[open_at + 1:i]
                return _split_top(inner), i + 1
    raise MacroError(f"unbalanced parentheses after position {open_at}")


def _split_top(inner: str) -> list[str]:
    args, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(inner[start:i])
            start = i + 1
    args.append(inner[start:])
    return args


def conditional_all(sql: str, variables: dict[str, Variable]) -> str:
    macro = "$__conditionalAll("
    idx = sql.rfind(macro)
    while idx != -1:
        args, end = _macro_args(sql, idx + len(macro) - 1)
        if len(args) != 2:
            return sql
        m = re.search(r"(?<=\$\{)[\w\d]+(?=\})|(?<=\$)[\w\d]+", args[1].strip())
        phrase = args[0]
        if m:
            var = variables.get(m.group(0))
            value = "" if var is None else var.current
            if value in ("", ALL) or value == [ALL] or value == []:
                phrase = "1=1"
        sql = sql[:idx] + phrase + sql[end:]
        idx = sql.rfind(macro)
    return sql


_VAR = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}")


def template(sql: str, variables: dict[str, Variable]) -> str:
    def value_of(var: Variable) -> Any:
        cur = var.current
        if cur == ALL or cur == [ALL]:
            return list(var.options)
        return cur

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        var = variables.get(name)
        if var is None:
            return m.group(0)  # not a variable (a macro such as $__timeFilter, or Grafana's own)
        value = value_of(var)
        if isinstance(value, list):
            return "'" + "','".join(value) + "'"  # the plugin's format for several values
        return str(value)

    return _VAR.sub(repl, sql)


def _dt(t: datetime) -> str:
    return f"toDateTime({int(t.timestamp())})"


def _dt64(t: datetime) -> str:
    return f"fromUnixTimestamp64Milli({int(t.timestamp() * 1000)})"


def _date(t: datetime) -> str:
    return f"toDate('{t.strftime('%Y-%m-%d')}')"


def backend_macros(sql: str, time_from: datetime, time_to: datetime, interval_s: float) -> str:
    def need(args: list[str], n: int, name: str) -> list[str]:
        args = [a.strip() for a in args]
        if len(args) != n:
            raise MacroError(f"$__{name}: expected {n} argument(s), received {len(args)}")
        return args

    def time_filter(a, ms=False):
        c = need(a, 1, "timeFilter")[0]
        f = _dt64 if ms else _dt
        return f"{c} >= {f(time_from)} AND {c} <= {f(time_to)}"

    def date_time_filter(a):
        d, t = need(a, 2, "dateTimeFilter")
        return (f"({d} >= {_date(time_from)} AND {d} <= {_date(time_to)}) AND "
                f"({t} >= {_dt(time_from)} AND {t} <= {_dt(time_to)})")

    with_args = {
        "timeFilter": lambda a: time_filter(a),
        "timeFilter_ms": lambda a: time_filter(a, ms=True),
        "dateFilter": lambda a: (lambda c: f"{c} >= {_date(time_from)} AND {c} <= {_date(time_to)}")(
            need(a, 1, "dateFilter")[0]),
        "dateTimeFilter": date_time_filter,
        "dt": date_time_filter,
        "timeInterval": lambda a: (f"toStartOfInterval(toDateTime({need(a, 1, 'timeInterval')[0]}), "
                                   f"INTERVAL {int(max(interval_s, 1))} second)"),
        "timeInterval_ms": lambda a: (f"toStartOfInterval(toDateTime64({need(a, 1, 'timeInterval_ms')[0]}, 3), "
                                      f"INTERVAL {int(max(math.floor(interval_s * 1000), 1))} millisecond)"),
    }
    plain = {
        "interval_s": lambda: str(int(max(interval_s, 1))),
        "fromTime": lambda: _dt(time_from), "toTime": lambda: _dt(time_to),
        "fromTime_ms": lambda: _dt64(time_from), "toTime_ms": lambda: _dt64(time_to),
    }
    out, i = [], 0
    pattern = re.compile(r"\$__(\w+)\b")
    while True:
        m = pattern.search(sql, i)
        if m is None:
            out.append(sql[i:])
            break
        name = m.group(1)
        out.append(sql[i:m.start()])
        if name in with_args and m.end() < len(sql) and sql[m.end()] == "(":
            args, end = _macro_args(sql, m.end())
            out.append(with_args[name](args))
            i = end
        elif name in plain:
            out.append(plain[name]())
            i = m.end()
        else:
            raise MacroError(f"$__{name} is not a macro of the ClickHouse plugin")
    return "".join(out)


def expand(sql: str, variables: dict[str, Variable], time_from: datetime, time_to: datetime,
           interval_s: float = 1.0) -> str:
    """The SQL ClickHouse receives for a panel query, given the dashboard's variables and time range."""
    sql = conditional_all(sql, variables)
    sql = template(sql, variables)
    return backend_macros(sql, time_from, time_to, interval_s)

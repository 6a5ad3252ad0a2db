"""How the CLI prints: tables on a terminal, tab-separated text when piped, strict JSON with --json.

Identifiers (run ids, file names, paths, commands to copy) are never folded or cut: on a terminal their
columns do not wrap, and a table that cannot fit them prints one record per block instead; piped, every table
is plain tab-separated text with a header line (as kubectl and gh print), one row a line. `--json` output is
RFC 8259 JSON: NaN and the infinities are the strings "NaN", "Infinity" and "-Infinity" (docs/cli.md).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table


@dataclass
class Col:
    """A table column; `ident`: its values are identifiers, never wrapped or cut."""

    header: str
    ident: bool = False
    justify: str = "left"


class Output:
    def __init__(self) -> None:
        self.json = False
        self.out = Console(soft_wrap=False)
        self.err = Console(stderr=True)

    @property
    def terminal(self) -> bool:
        return self.out.is_terminal

    # -- JSON -------------------------------------------------------------------------------------
    def print_json(self, value: Any) -> None:
        sys.stdout.write(dumps(value) + "\n")
        sys.stdout.flush()

    # -- tables -----------------------------------------------------------------------------------
    def table(self, cols: Sequence[Col], rows: Iterable[Sequence[Any]], title: str | None = None) -> None:
        rows = [[text(v) for v in r] for r in rows]
        if not self.terminal:
            self.tsv(cols, rows)
            return
        t = Table(title=title, title_justify="left")
        for c, width in zip(cols, _widths(cols, rows)):
            if c.ident:
                t.add_column(c.header, no_wrap=True, min_width=width, overflow="ignore", justify=c.justify)
            else:
                t.add_column(c.header, overflow="fold", justify=c.justify)
        for r in rows:
            t.add_row(*r)
        if Measurement.get(self.out, self.out.options, t).minimum > self.out.width:
            self.records(cols, rows, title)  # the identifiers do not fit side by side: one block per row
            return
        self.out.print(t, highlight=False)

    def tsv(self, cols: Sequence[Col], rows: list[list[str]]) -> None:
        lines = ["\t".join(c.header for c in cols)] + ["\t".join(_cell(v) for v in r) for r in rows]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    def records(self, cols: Sequence[Col], rows: list[list[str]], title: str | None = None) -> None:
        if title:
            self.out.print(title, highlight=False, markup=False)
        for i, r in enumerate(rows):
            if i:
                self.out.print()
            self.pairs([(c.header, v) for c, v in zip(cols, r)])

    def pairs(self, items: Sequence[tuple[str, Any]], indent: int = 0) -> None:
        """Aligned `key  value` lines (values as they are: never folded, a long one runs on)."""
        if not items:
            return
        width = max(len(k) for k, _ in items)
        for k, v in items:
            line = f"{' ' * indent}{k:<{width}}  {text(v)}"
            if self.terminal:
                self.out.print(line, highlight=False, markup=False, crop=False, overflow="ignore")
            else:
                sys.stdout.write(line + "\n")

    def line(self, message: str = "", markup: bool = False) -> None:
        """A line of prose (wraps on a terminal; identifiers in it are never styled, so copying is exact)."""
        self.out.print(message, highlight=False, markup=markup, soft_wrap=not self.terminal)


def strict(value: Any) -> Any:
    """`value` with every non-finite float as the string JSON has no number for."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value: Any) -> str:
    return json.dumps(strict(value), indent=2, allow_nan=False, default=str, ensure_ascii=False)


def num(x: Any) -> str:
    """A number in its shortest round-trip form (repr), NaN and the infinities spelled as in --json."""
    if x is None:
        return ""
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "Infinity" if x > 0 else "-Infinity"
        return repr(x)
    return str(x)


def text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, float, bool)):
        return num(v)
    if isinstance(v, (dict, list)):
        return dumps_compact(v)
    return str(v)


def dumps_compact(v: Any) -> str:
    return json.dumps(strict(v), allow_nan=False, default=str, ensure_ascii=False, separators=(", ", ": "))


def _cell(v: str) -> str:
    """A TSV cell: a tab or a line break inside a value would split it."""
    return v.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _widths(cols: Sequence[Col], rows: list[list[str]]) -> list[int]:
    return [max([len(c.header)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]


OUT = Output()

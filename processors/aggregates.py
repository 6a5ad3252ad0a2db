"""Running aggregates per (run, metric), computed on whole batches with numpy."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from runwatch.core.events import MetricBatch

# state row layout: [count, min, max, first, last, last_step, last_ts_us, last_text, kind, first_ts_us]
COUNT, MIN, MAX, FIRST, LAST, LAST_STEP, LAST_TS, LAST_TEXT, KIND, FIRST_TS = range(10)


def metric_key(name: str, column: str) -> str:
    return f"{name}\x1f{column}" if column else name


def split_key(key: str) -> tuple[str, str]:
    name, _, column = key.partition("\x1f")
    return name, column


def batch_aggregates(batch: MetricBatch) -> dict[str, list[Any]]:
    """Aggregates of one batch per metric key; min and max ignore NaN (NaN only if every value is NaN)."""
    out: dict[str, list[Any]] = {}
    names = batch.names
    idx, step, ts, val = batch.arrays()
    if len(idx):
        keys = [metric_key(n.name, n.column) for n in names]
        # several name-table entries (dtypes) may share one key: map entries to key ids first
        key_ids: dict[str, int] = {}
        entry_key = np.array([key_ids.setdefault(k, len(key_ids)) for k in keys], dtype=np.int64)
        kid = entry_key[idx]
        order = np.argsort(kid, kind="stable")
        sk = kid[order]
        starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
        ends = np.r_[starts[1:], len(sk)]
        v = val[order]
        with np.errstate(invalid="ignore"):
            mins = np.fmin.reduceat(v, starts)
            maxs = np.fmax.reduceat(v, starts)
        counts = ends - starts
        first_pos = order[starts]
        last_pos = order[ends - 1]
        key_list = list(key_ids)
        kind_of = {metric_key(n.name, n.column): n.kind.value for n in names}
        for j, s in enumerate(starts):
            k = key_list[int(sk[s])]
            lp, fp = int(last_pos[j]), int(first_pos[j])
            out[k] = [int(counts[j]), float(mins[j]), float(maxs[j]), float(val[fp]), float(val[lp]),
                      int(step[lp]), int(ts[lp]), None, kind_of[k], int(ts[fp])]
    if batch.n_text:
        s_idx, s_step, s_ts, texts = batch.text_arrays()
        for i in range(len(texts)):  # strings are few: per point is fine here
            n = names[int(s_idx[i])]
            k = metric_key(n.name, n.column)
            row = out.get(k)
            if row is None:
                row = out[k] = [0, math.nan, math.nan, math.nan, math.nan, int(s_step[i]), int(s_ts[i]), None,
                                n.kind.value, int(s_ts[i])]
            row[COUNT] += 1
            if int(s_ts[i]) >= row[LAST_TS]:
                row[LAST_TEXT] = texts[i]
                row[LAST_STEP] = int(s_step[i])
                row[LAST_TS] = int(s_ts[i])
    return out


def merge(state: dict[str, list[Any]], batch_rows: dict[str, list[Any]]) -> None:
    """Fold one batch's aggregates into the run's state (in place)."""
    for k, b in batch_rows.items():
        cur = state.get(k)
        if cur is None:
            state[k] = list(b)
            continue
        cur[COUNT] += b[COUNT]
        cur[MIN] = _fmin(cur[MIN], b[MIN])
        cur[MAX] = _fmax(cur[MAX], b[MAX])
        if b[FIRST_TS] < cur[FIRST_TS]:
            cur[FIRST], cur[FIRST_TS] = b[FIRST], b[FIRST_TS]
        if b[LAST_TS] >= cur[LAST_TS]:
            cur[LAST], cur[LAST_STEP], cur[LAST_TS] = b[LAST], b[LAST_STEP], b[LAST_TS]
            if b[LAST_TEXT] is not None:
                cur[LAST_TEXT] = b[LAST_TEXT]


def _fmin(a: float, b: float) -> float:
    if a != a:
        return b
    if b != b:
        return a
    return a if a <= b else b


def _fmax(a: float, b: float) -> float:
    if a != a:
        return b
    if b != b:
        return a
    return a if a >= b else b


def to_rows(state: dict[str, list[Any]], keys: list[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for k in keys if keys is not None else list(state):
        r = state[k]
        name, column = split_key(k)
        rows.append({"name": name, "column": column, "kind": r[KIND], "count": r[COUNT], "min": r[MIN],
                     "max": r[MAX], "first": r[FIRST], "last": r[LAST], "last_text": r[LAST_TEXT] or "",
                     "last_step": r[LAST_STEP], "last_ts": r[LAST_TS]})
    return rows


__all__ = ["batch_aggregates", "merge", "to_rows", "metric_key"]

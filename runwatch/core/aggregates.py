"""Running aggregates per (run, metric): the one definition, computed on whole arrays with numpy.

The processors fold each batch into a run's state with `batch_aggregates` and `merge`; the sink's repair
(sinks/repair.py) recomputes a run from its stored points with `aggregate`. Both use these rules:

- count: every point, strings included;
- min, max: of the numbers, NaN ignored (NaN only when every number is NaN);
- first, last: the value of the point that comes first / last in the order (time, event seq, step), a
  string point's value being NaN; last_step and last_ts are that last point's;
- last_text: the text of the last string point in the same order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runwatch.core.events import MetricBatch

# A state row. The order (time, event seq, step) of first, last and last_text is kept to merge batches.
(COUNT, MIN, MAX, FIRST, LAST, LAST_STEP, LAST_TS, LAST_TEXT, KIND, FIRST_TS,
 FIRST_SEQ, FIRST_STEP, LAST_SEQ, TEXT_TS, TEXT_SEQ, TEXT_STEP) = range(16)
ROW_LEN = 16


def metric_key(name: str, column: str) -> str:
    return f"{name}\x1f{column}" if column else name


def split_key(key: str) -> tuple[str, str]:
    name, _, column = key.partition("\x1f")
    return name, column


def aggregate(keys: list[str], kinds: list[str], key_id: np.ndarray, step: np.ndarray, ts: np.ndarray,
              seq: np.ndarray, value: np.ndarray, text: list[str | None] | None = None) -> dict[str, list[Any]]:
    """Aggregates of a set of points, one row per key. `key_id[i]` indexes `keys` (and `kinds`); `text[i]` is
    the text of a string point (its value NaN), None for a number; `text` None: no string points."""
    n = len(key_id)
    if not n:
        return {}
    order = np.lexsort((step, seq, ts, key_id))  # by key, then (time, seq, step): ~30 ns a point
    sk = key_id[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    firsts, lasts = order[starts], order[np.r_[starts[1:], n] - 1]
    v = value[order]
    with np.errstate(invalid="ignore"):
        mins = np.fmin.reduceat(v, starts)
        maxs = np.fmax.reduceat(v, starts)
    counts = np.diff(np.r_[starts, n])
    out: dict[str, list[Any]] = {}
    for j, s in enumerate(starts.tolist()):
        k = int(sk[s])
        fp, lp = int(firsts[j]), int(lasts[j])
        out[keys[k]] = [int(counts[j]), float(mins[j]), float(maxs[j]), float(value[fp]), float(value[lp]),
                        int(step[lp]), int(ts[lp]), None, kinds[k], int(ts[fp]), int(seq[fp]), int(step[fp]),
                        int(seq[lp]), None, None, None]
    if text is not None:  # the last text of each key, among the (few) string points, in the same order
        pos = [i for i, t in enumerate(text) if t is not None]
        if pos:
            idx = np.array(pos)
            for i in idx[np.lexsort((step[idx], seq[idx], ts[idx], key_id[idx]))].tolist():
                row = out[keys[int(key_id[i])]]  # later points of a key overwrite earlier ones
                row[LAST_TEXT], row[TEXT_TS], row[TEXT_SEQ], row[TEXT_STEP] = text[i], int(ts[i]), int(seq[i]), int(step[i])
    return out


def batch_aggregates(batch: MetricBatch, seq: int = 0) -> dict[str, list[Any]]:
    """Aggregates of one batch (its points all carry the event's `seq`)."""
    names = batch.names
    keys: list[str] = []
    kinds: list[str] = []
    key_ids: dict[str, int] = {}
    for nm in names:  # several name-table entries (dtypes) may share one key
        k = metric_key(nm.name, nm.column)
        if k not in key_ids:
            key_ids[k] = len(keys)
            keys.append(k)
            kinds.append(nm.kind.value)
    entry_key = np.array([key_ids[metric_key(nm.name, nm.column)] for nm in names], np.int64)
    parts = batch.parts()
    if not parts:
        return {}
    idx = np.concatenate([p[0] for p in parts])
    texts = None
    if any(p[4] is not None for p in parts):
        texts = [t for p in parts for t in (p[4] if p[4] is not None else [None] * len(p[0]))]
    return aggregate(keys, kinds, entry_key[idx], np.concatenate([p[1] for p in parts]),
                     np.concatenate([p[2] for p in parts]), np.full(len(idx), seq, np.int64),
                     np.concatenate([p[3] for p in parts]), texts)


def _upgrade(row: list[Any]) -> list[Any]:
    """A state row of the earlier layout (10 fields, no seq or step orders): orders from what it had."""
    if len(row) >= ROW_LEN:
        return row
    return list(row[:10]) + [-1, -1, -1, row[LAST_TS] if row[LAST_TEXT] is not None else None, -1,
                             row[LAST_STEP] if row[LAST_TEXT] is not None else None]


def merge(state: dict[str, list[Any]], batch_rows: dict[str, list[Any]]) -> None:
    """Fold aggregates of further points into a run's state (in place); the same rules as `aggregate`."""
    for k, b in batch_rows.items():
        cur = state.get(k)
        if cur is None:
            state[k] = list(b)
            continue
        cur = state[k] = _upgrade(cur)
        cur[COUNT] += b[COUNT]
        cur[MIN] = _fmin(cur[MIN], b[MIN])
        cur[MAX] = _fmax(cur[MAX], b[MAX])
        if (b[FIRST_TS], b[FIRST_SEQ], b[FIRST_STEP]) < (cur[FIRST_TS], cur[FIRST_SEQ], cur[FIRST_STEP]):
            cur[FIRST], cur[FIRST_TS], cur[FIRST_SEQ], cur[FIRST_STEP] = b[FIRST], b[FIRST_TS], b[FIRST_SEQ], b[FIRST_STEP]
        if (b[LAST_TS], b[LAST_SEQ], b[LAST_STEP]) >= (cur[LAST_TS], cur[LAST_SEQ], cur[LAST_STEP]):
            cur[LAST], cur[LAST_STEP], cur[LAST_TS], cur[LAST_SEQ] = b[LAST], b[LAST_STEP], b[LAST_TS], b[LAST_SEQ]
        if b[LAST_TEXT] is not None and (cur[LAST_TEXT] is None or (b[TEXT_TS], b[TEXT_SEQ], b[TEXT_STEP]) >= (
                cur[TEXT_TS], cur[TEXT_SEQ], cur[TEXT_STEP])):
            cur[LAST_TEXT], cur[TEXT_TS], cur[TEXT_SEQ], cur[TEXT_STEP] = b[LAST_TEXT], b[TEXT_TS], b[TEXT_SEQ], b[TEXT_STEP]


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
    """Rows of metric_aggregates (without run, experiment and version)."""
    rows = []
    for k in keys if keys is not None else list(state):
        r = state[k]
        name, column = split_key(k)
        rows.append({"name": name, "column": column, "kind": r[KIND], "count": r[COUNT], "min": r[MIN],
                     "max": r[MAX], "first": r[FIRST], "last": r[LAST], "last_text": r[LAST_TEXT] or "",
                     "last_step": r[LAST_STEP], "last_ts": r[LAST_TS]})
    return rows


__all__ = ["aggregate", "batch_aggregates", "merge", "to_rows", "metric_key", "split_key"]

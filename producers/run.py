"""Workspace, Experiment and Run: Azure ML v1's logging names, feeding the background emitter."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runwatch.core import names
from runwatch.core.client import ApiClient, run_path
from runwatch.core.errors import FileError, NotFound, RunwatchError
from runwatch.core.events import (
    DType,
    Heartbeat,
    MetricKind,
    MetricName,
    PropertiesSet,
    RunCreated,
    RunStatus,
    StatusChanged,
    TagsSet,
    this_source,
)
from runwatch.core.names import SCRIPT_RUN, new_run_id
from runwatch.core.settings import Settings
from runwatch.core.states import TERMINAL

from . import local
from . import values as V
from .buffer import columns
from .emitter import Emitter, get_emitter, on_fork
from .values import MetricError, MetricTypeError

log = logging.getLogger("runwatch")
_time = time.time
_FLOAT, _STR = DType.float, DType.str
_EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}$")


class Run:
    """A run of an experiment. `Run(experiment, run_id)` reopens an existing run."""

    def __init__(self, experiment: "Experiment", run_id: str, outputs: Any = None, **kwargs: Any):
        self.experiment = experiment
        self.id = run_id
        self._settings = experiment.workspace.settings
        self._offline = bool(kwargs.pop("_offline", False))
        self.display_name = kwargs.pop("display_name", None)
        self.parent_id: str | None = kwargs.pop("parent_id", None)
        self.run_type = kwargs.pop("run_type", "interactive")
        self._status = kwargs.pop("status", None)
        self._properties: dict[str, str] = dict(kwargs.pop("properties", {}) or {})
        self._tags: dict[str, str | None] = dict(kwargs.pop("tags", {}) or {})
        #: Collected into the run's files (as outputs/...) when it completes or fails.
        self._outputs: Path | None = Path(outputs).resolve() if outputs else None
        #: A submitted run's launcher process (subprocess.Popen), in the process that submitted it; else None.
        self.launcher = None
        fetch = kwargs.pop("_fetch", True)
        if kwargs:
            raise TypeError(f"Run() got unexpected argument(s): {', '.join(kwargs)}")
        self._reset_caches()
        self._child_count = itertools.count(1)
        on_fork(self._reset_caches)
        if fetch:
            self._load_details()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def _start(cls, experiment: "Experiment", *, display_name: str | None = None, parent: "Run | None" = None,
               run_id: str | None = None, offline: bool = False, run_type: str = "interactive",
               properties: Mapping[str, str] | None = None, tags: Mapping[str, Any] | None = None,
               status: RunStatus = RunStatus.Running, compute_target: str = "local",
               heartbeats: bool = True, outputs: Any = None) -> "Run":
        rid = run_id or new_run_id(experiment.name)
        run = cls(experiment, rid, outputs, display_name=display_name, parent_id=parent.id if parent else None,
                  run_type=run_type, status=status.value, _offline=offline, _fetch=False)
        limits = V.Limits(experiment.workspace.settings)
        props = limits.properties(properties or {})
        tag_map = limits.tags(tags or {})
        if display_name is not None:
            V.check_name(display_name, "display_name", limits.name, "display_name")
        limits.check_run(len(tag_map), len(props), V.Limits.size(tag_map, props), "start")
        run._properties.update(props)
        run._tags.update(tag_map)
        created = time.time()
        local.remember(local.Written(rid, experiment.name, run.parent_id, run_type, compute_target, display_name,
                                     created, status=status.value, status_ts=created, tags=dict(tag_map),
                                     properties=dict(props)))
        run._emit(RunCreated(display_name=display_name, parent_run_id=run.parent_id, run_type=run_type,
                             compute_target=compute_target, status=status, properties=props, tags=tag_map,
                             created_ts=created))
        if status not in TERMINAL and heartbeats:
            run._em.open_run(run.id, experiment.name)
        return run

    @classmethod
    def get(cls, workspace: "Workspace", run_id: str) -> "Run":
        """Reopen a run by id alone (its experiment is looked up)."""
        details = _read_record(workspace, run_id)
        run = cls(Experiment(workspace, details["experiment"]), run_id, _fetch=False)
        run._apply_details(details)
        return run

    @classmethod
    def get_context(cls, allow_offline: bool = True) -> "Run":
        """The run the launcher started this process for; elsewhere an offline run (events wait in the spool)."""
        run_id = os.environ.get("RUNWATCH_RUN_ID")
        ws = Workspace.from_config()
        if run_id:
            exp = Experiment(ws, os.environ.get("RUNWATCH_EXPERIMENT", "default"))
            run = cls(exp, run_id, run_type=SCRIPT_RUN, status=RunStatus.Running.value, _fetch=False)
            run._em.open_run(run.id, exp.name)
            return run
        if not allow_offline:
            raise RunwatchError("Run.get_context(): this process was not started by the runwatch launcher")
        exp = Experiment(ws, os.environ.get("RUNWATCH_EXPERIMENT", "offline"))
        return cls._start(exp, offline=True, run_type="offline")

    def _reset_caches(self) -> None:
        self._em: Emitter = get_emitter(self._settings, offline=self._offline)
        self._buffer = self._em.buffer
        self._fast: dict[str, tuple[int, Any]] = {}
        self._entries: dict[tuple, int] = {}
        self._counters: dict[tuple[str, str], Any] = getattr(self, "_counters", {})
        self._kind_of: dict[str, MetricKind] = getattr(self, "_kind_of", {})
        self._row_columns: dict[str, tuple[str, ...]] = getattr(self, "_row_columns", {})

    @property
    def emitter(self) -> Emitter:
        """This process's background sender for the run: `.stats` counts what was sent, spooled, dropped."""
        return self._em

    # -- metrics: the hot path ------------------------------------------------------------
    def log(self, name: str, value: Any, description: str = "", step: int | None = None) -> None:
        """Log a value under `name`; repeated calls make a series (step = call count unless given)."""
        if step is None and type(value) is float:
            e = self._fast.get(name)
            if e is not None:
                buf = self._buffer
                num = buf.num
                num.append((e[0], next(e[1]), _time(), value))
                if len(num) >= buf.mark:
                    self._em.full()
                return
        self._log_slow(name, value, step)

    def _log_slow(self, name: str, value: Any, step: Any) -> None:
        dtype, v = V.coerce(value, "run.log")
        self._claim(name, MetricKind.scalar, "run.log")
        s = V.check_step(step, "run.log") if step is not None else None
        counter = self._counter(name, MetricKind.scalar)
        if s is None:
            s = next(counter)
        gidx = self._entry(name, MetricKind.scalar, "", dtype)
        buf = self._buffer
        if dtype is _STR:
            wake = buf.add_text((gidx, s, _time(), v))
        else:
            wake = buf.add_number((gidx, s, _time(), v))
            if dtype is _FLOAT:
                self._fast[name] = (gidx, counter)
        if wake:
            self._em.full()
        else:
            self._em.ensure_started()

    def log_list(self, name: str, value: Iterable[Any], description: str = "") -> None:
        """Log a whole list of values (any iterable) as one series; step = index."""
        self._claim(name, MetricKind.list, "run.log_list")
        values = V.materialise(value, "run.log_list")
        prepared = self._column(name, MetricKind.list, "", values, "run.log_list")
        start = _reserve_steps(self._counter(name, MetricKind.list), len(values))
        self._append_column(prepared, start)

    def log_row(self, name: str, description: str | None = None, **kwargs: Any) -> None:
        """Log one row of the table `name`; repeated calls add rows (columns may not change)."""
        if not kwargs:
            raise MetricError("run.log_row: give the row's columns as keyword arguments, e.g. log_row(name, x=1, y=2)")
        cols = tuple(kwargs)
        coerced = [(col, *V.coerce(v, "run.log_row", f"column {col!r}")) for col, v in kwargs.items()]
        known = self._row_columns.get(name)
        if known is not None and set(known) != set(cols):
            raise MetricError(f"run.log_row: table {name!r} has columns {list(known)}; this row has {list(cols)}")
        self._claim(name, MetricKind.row, "run.log_row")
        for col in cols:
            V.check_name(col, "run.log_row", self._settings.max_name_length, "column name")
        self._row_columns.setdefault(name, cols)
        step = next(self._counter(name, MetricKind.row))
        t = _time()
        buf = self._buffer
        wake = False
        for col, dtype, v in coerced:
            gidx = self._entry(name, MetricKind.row, col, dtype)
            wake |= buf.add_text((gidx, step, t, v)) if dtype is _STR else buf.add_number((gidx, step, t, v))
        self._em.full() if wake else self._em.ensure_started()

    def log_table(self, name: str, value: Mapping[str, Iterable[Any]], description: str = "") -> None:
        """Log a whole table: a dict of equally long columns. Logged again under the same name, the rows are
        added (the columns may not change)."""
        cols = V.table_columns(value, "run.log_table", self._settings.max_name_length)
        known = self._row_columns.get(name)
        if known is not None and set(known) != set(cols):
            raise MetricError(f"run.log_table: table {name!r} has columns {list(known)}; these are {list(cols)}")
        self._claim(name, MetricKind.table, "run.log_table")
        prepared = [self._column(name, MetricKind.table, col, vals, "run.log_table") for col, vals in cols.items()]
        self._row_columns.setdefault(name, tuple(cols))
        start = _reserve_steps(self._counter(name, MetricKind.table), len(next(iter(cols.values()))))
        for p in prepared:
            self._append_column(p, start)

    # -- metrics: helpers -------------------------------------------------------------------
    def _claim(self, name: str, kind: MetricKind, call: str) -> None:
        known = self._kind_of.get(name)
        if known is kind:
            return
        V.check_name(name, call, self._settings.max_name_length)
        if known is not None:
            raise MetricError(f"{call}: {name!r} was logged as a {known.value} metric; a name keeps its kind")
        if len(self._kind_of) >= self._settings.max_metric_names:
            raise MetricError(
                f"{call}: run {self.id} already has {len(self._kind_of)} distinct metric names "
                f"(max_metric_names); {name!r} was not logged")
        self._kind_of[name] = kind

    def _counter(self, name: str, kind: MetricKind):
        key = (name, kind.value)
        c = self._counters.get(key)
        if c is None:
            c = self._counters.setdefault(key, itertools.count())
        return c

    def _entry(self, name: str, kind: MetricKind, column: str, dtype: DType) -> int:
        key = (name, kind, column, dtype)
        gidx = self._entries.get(key)
        if gidx is None:
            gidx = self._em.register(self.id, self.experiment.name,
                                     MetricName(name=name, kind=kind, column=column, dtype=dtype))
            self._entries[key] = gidx
        return gidx

    def _column(self, name: str, kind: MetricKind, column: str, values: list | np.ndarray, call: str) -> tuple:
        """One column of values checked (every item, before anything is logged): (name, kind, column, numeric
        array or None, [(dtype, value)] or None)."""
        if isinstance(values, np.ndarray):
            arr = V.numeric_array(values, call, column or "value")
            if arr is not None:
                return name, kind, column, arr, None
        items = [V.coerce(v, call, f"{column + ' ' if column else ''}item {i}") for i, v in enumerate(values)]
        return name, kind, column, None, items

    def _append_column(self, prepared: tuple, start: int) -> None:
        name, kind, column, arr, items = prepared
        t = _time()
        buf = self._buffer
        wake = False
        if arr is not None:
            dtype, vals = arr
            n = len(vals)
            if not n:
                return
            gidx = self._entry(name, kind, column, dtype)
            wake = buf.add_columns(columns(np.full(n, gidx, np.uint32), np.arange(start, start + n, dtype=np.int64), t,
                                           vals))
        else:
            nums_idx, nums_step, nums_val = [], [], []
            for i, (dtype, v) in enumerate(items):
                gidx = self._entry(name, kind, column, dtype)
                if dtype is _STR:
                    wake |= buf.add_text((gidx, start + i, t, v))
                else:
                    nums_idx.append(gidx)
                    nums_step.append(start + i)
                    nums_val.append(v)
            if nums_idx:
                wake |= buf.add_columns(columns(np.array(nums_idx, np.uint32), np.array(nums_step, np.int64), t,
                                                np.array(nums_val, np.float64)))
        self._em.added(wake)

    # -- tags, properties, lifecycle ---------------------------------------------------------
    def tag(self, key: str, value: Any = None) -> None:
        """Set a tag; a tag without a value has value None."""
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set several tags at once; only what changes travels (one event for all of them)."""
        limits = V.Limits(self._settings)
        clean = limits.tags(tags, "set_tags")
        changed = {k: v for k, v in clean.items() if k not in self._tags or self._tags[k] != v}
        if not changed:
            return
        size = self._state_chars() + V.Limits.delta(self._tags, changed)
        limits.check_run(len(self._tags) + sum(k not in self._tags for k in changed), len(self._properties), size,
                         "set_tags")
        self._tags.update(changed)
        self._chars = size
        w = self._written()
        w.tags.update(changed)
        w.removed_tags -= set(changed)
        self._emit(TagsSet(tags=changed))

    def add_properties(self, properties: Mapping[str, Any]) -> None:
        """Add properties; they are immutable: a property already set cannot change."""
        limits = V.Limits(self._settings)
        clean = limits.properties(properties, "add_properties")
        for k, v in clean.items():
            if k in self._properties and self._properties[k] != v:
                raise MetricError(
                    f"add_properties: property {k!r} is already {self._properties[k]!r}; properties are immutable")
        new = {k: v for k, v in clean.items() if k not in self._properties}
        if not new:
            return
        size = self._state_chars() + V.Limits.delta(self._properties, new)
        limits.check_run(len(self._tags), len(self._properties) + len(new), size, "add_properties")
        self._properties.update(new)
        self._chars = size
        self._written().properties.update(new)
        self._emit(PropertiesSet(properties=new))

    def child_run(self, name: str | None = None, run_id: str | None = None, outputs: Any = None) -> "Run":
        """Start a child run (any depth). Use it in a `with` block to complete or fail it."""
        rid = run_id or f"{self.id}_{next(self._child_count)}"
        return Run._start(self.experiment, display_name=name, parent=self, run_id=rid, offline=self._offline,
                          outputs=outputs)

    def start(self) -> None:
        self._set_status(RunStatus.Running)

    def complete(self) -> None:
        """Mark the run Completed. A submitted run is completed by its launcher when every process
        has exited: here it only flushes what was logged."""
        if self.run_type == SCRIPT_RUN:
            self._em.flush(timeout=10.0)
            return
        self._finish(RunStatus.Completed)

    def fail(self, error_details: Any = None, error_code: str | None = None) -> None:
        """Mark the run Failed (a submitted run too: its launcher then stops every process)."""
        error = {"message": str(error_details) if error_details is not None else "", "code": error_code}
        self._finish(RunStatus.Failed, error)

    def cancel(self) -> None:
        """Cancel the run. A submitted run moves to CancelRequested; its launcher stops every
        process and then marks it Canceled."""
        if self.run_type == SCRIPT_RUN:
            self._set_status(RunStatus.CancelRequested)
            self._em.flush(timeout=10.0)
            return
        self._finish(RunStatus.Canceled)

    def _finish(self, status: RunStatus, error: dict | None = None) -> None:
        refused = self._collect_outputs() if status in (RunStatus.Completed, RunStatus.Failed) else []
        self._set_status(status, error)
        self._em.close_run(self.id)
        # Completion is the one place the SDK waits on I/O, bounded: the points logged so far
        # reach the broker (or the spool) before the run says it is done.
        self._em.flush(timeout=10.0)
        dropped = self._em.stats.dropped_by_run.get(self.id, 0)
        if dropped:  # the last word on what was lost, after the final flush counted it
            self._emit(Heartbeat(dropped=dropped))
            self._em.flush(timeout=10.0)
        if refused:
            raise FileError(f"run {self.id} is {status.value}, but {len(refused)} file(s) under outputs/ were not "
                            "stored: " + "; ".join(refused))

    def _collect_outputs(self) -> list[str]:
        if self._outputs is None or self._offline or not self._outputs.is_dir():
            return []
        from .files import collect_outputs

        try:
            stored, refused = collect_outputs(self._api(), self.id, self._outputs, self._settings.max_file_bytes)
        except RunwatchError as exc:  # the stack is away: the run still ends; say what was not kept
            log.warning("runwatch: the files under %s were not stored for run %s: %s", self._outputs, self.id, exc)
            return [f"{self._outputs}: {exc}"]
        for ev in stored:
            self._emit(ev)
        return refused

    # -- files ---------------------------------------------------------------------------------
    def upload_file(self, name: str, path_or_stream: Any, datastore_name: str | None = None) -> dict[str, Any]:
        """Store a file (a path, or a binary stream) under `name`; streamed, checksummed on arrival."""
        from .files import upload

        ev = upload(self._api(), self.id, name, path_or_stream, self._settings.max_file_bytes)
        self._emit(ev)
        return {"name": ev.name, "size": ev.size, "sha256": ev.sha256, "content_type": ev.content_type}

    def upload_files(self, names: list[str], paths: list[Any], **kwargs: Any) -> list[dict[str, Any]]:
        if len(names) != len(paths):
            raise MetricError(f"upload_files: {len(names)} names for {len(paths)} paths")
        return [self.upload_file(n, p) for n, p in zip(names, paths)]

    def upload_folder(self, name: str, path: str | os.PathLike, datastore_name: str | None = None) -> list[dict]:
        """Store every file under the directory `path` as name/<relative path>."""
        root = Path(path)
        if not root.is_dir():
            raise FileError(f"upload_folder: {str(root)!r} is not a directory")
        return [self.upload_file(f"{name.rstrip('/')}/{p.relative_to(root).as_posix()}", p)
                for p in sorted(root.rglob("*")) if p.is_file()]

    def log_image(self, name: str, path: str | os.PathLike | None = None, plot: Any = None,
                  description: str = "") -> None:
        """Log an image: a file (`path`) or a matplotlib figure or pyplot (`plot`). It is stored as a file of
        the run and appears in get_metrics() under `name` as its file name."""
        if (path is None) == (plot is None):
            raise MetricError("run.log_image: give exactly one of path= (an image file) or plot= (a matplotlib "
                              "figure or pyplot)")
        self._claim(name, MetricKind.image, "run.log_image")
        n = next(self._counter(name, MetricKind.image))
        stem = f"images/{name.replace('/', '_').strip() or 'image'}_{n}"
        if plot is not None:
            if not hasattr(plot, "savefig"):
                raise MetricTypeError(f"run.log_image: plot must be a matplotlib figure or pyplot, not "
                                      f"{type(plot).__name__}")
            buf = io.BytesIO()
            plot.savefig(buf, format="png")
            buf.seek(0)
            file_name, source = stem + ".png", buf
        else:
            file_name, source = stem + (Path(path).suffix.lower() or ".png"), path
        from .files import upload

        try:
            ev = upload(self._api(), self.id, file_name, source, self._settings.max_file_bytes, call="run.log_image")
        except FileError:
            raise
        except RunwatchError as exc:  # the stack is away: training goes on, the loss is counted and said
            log.warning("runwatch: run.log_image(%r) was not stored: %s", name, exc)
            self._em.count_drop(self.id, 1)
            return
        self._emit(ev.model_copy(update={"origin": "image"}))
        gidx = self._entry(name, MetricKind.image, "", _STR)
        self._em.added(self._buffer.add_text((gidx, n, _time(), ev.name)))

    def download_file(self, name: str, output_file_path: str | os.PathLike | None = None,
                      _validate_checksum: bool = False) -> str:
        """Write one of the run's files (stored or log) to `output_file_path` (default: its base name here)."""
        from .files import download

        return str(download(self._api(), self.id, name, output_file_path)[0])

    def download_files(self, prefix: str | None = None, output_directory: str | os.PathLike | None = None,
                       output_paths: Any = None, batch_size: int = 100, append_prefix: bool = True) -> list[str]:
        """Write every file of the run whose name starts with `prefix` under `output_directory`."""
        from .files import download, target_in

        out = Path(output_directory) if output_directory is not None else Path.cwd()
        names = [n for n in self.get_file_names() if prefix is None or n.startswith(prefix)]
        written = []
        for n in names:
            rel = n if append_prefix or not prefix else n[len(prefix):].lstrip("/")
            target = target_in(out, rel)
            download(self._api(), self.id, n, target)
            written.append(str(target))
        return written

    def _set_status(self, status: RunStatus, error: dict | None = None) -> None:
        self._status = status.value
        w = self._written()
        w.status, w.status_ts, w.error = status.value, time.time(), error
        self._emit(StatusChanged(status=status, error=error))

    def _state_chars(self) -> int:
        """Characters of the run's tags and properties (kept as they change: 10,000 tag calls must not cost
        10,000 sums over a growing set)."""
        if getattr(self, "_chars", None) is None:
            self._chars = V.Limits.size(self._tags, self._properties)
        return self._chars

    def _written(self) -> local.Written:
        """What this process wrote of the run (read-your-writes, producers/local.py)."""
        w = local.written(self.id)
        if w is None:  # a run reopened here (Run.get, get_context): it was not created by this process
            w = local.remember(local.Written(self.id, self.experiment.name, self.parent_id, self.run_type or "",
                                             "local", None, time.time(), created_here=False))
        return w

    def _emit(self, payload: Any) -> None:
        self._em.send_control(self.id, self.experiment.name, payload)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything logged so far reached the broker or the spool; True when it did."""
        return self._em.flush(timeout)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.complete()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.cancel()
        else:
            self.fail(error_details=f"{exc_type.__name__}: {exc}")
        return False

    # -- readers (through the read API) -------------------------------------------------------
    def _api(self) -> ApiClient:
        return self.experiment.workspace.read_api()

    def _load_details(self) -> None:
        self._apply_details(self._record())

    def _record(self, **params: Any) -> dict[str, Any]:
        """The run's record from the read API, with this process's writes laid over it until it has them."""
        return _read_record(self.experiment.workspace, self.id, self._em, **params)

    def fetch_state(self) -> dict[str, Any]:
        """The run's record as the read API gives it (snake_case keys), showing every write this process made
        before the call (docs/architecture.md, "Read-your-writes")."""
        return self._record()

    def _apply_details(self, d: Mapping[str, Any]) -> None:
        self.display_name = d.get("display_name") or self.display_name
        self.parent_id = d.get("parent_run_id") or self.parent_id
        self.run_type = d.get("run_type") or self.run_type
        self._status = d.get("status") or self._status
        self._properties = dict(d.get("properties") or {})
        self._tags = dict(d.get("tags") or {})
        self._chars = None

    def get_status(self) -> str:
        self._status = self._record()["status"]
        return self._status

    @property
    def status(self) -> str | None:
        return self._status

    def get_details(self) -> dict[str, Any]:
        d = self._record(gaps="true")
        self._apply_details(d)
        return {
            "runId": d["run_id"], "experiment": d["experiment"], "status": d["status"],
            "displayName": d.get("display_name"), "parentRunId": d.get("parent_run_id"),
            "startTimeUtc": d.get("start_time"), "endTimeUtc": d.get("end_time"),
            "durationSeconds": d.get("duration_s"), "properties": d.get("properties", {}),
            "tags": d.get("tags", {}), "error": d.get("error"), "target": d.get("compute_target"),
            "runType": d.get("run_type"), "droppedPoints": d.get("dropped_points", 0),
            # events this run's processes numbered that never reached the store (docs/reliability.md)
            "missingEvents": sum((d.get("missing_events") or {}).values()),
        }

    def get_tags(self) -> dict[str, str | None]:
        return dict(self._record()["tags"])

    def get_properties(self) -> dict[str, str]:
        return dict(self._record()["properties"])

    def get_metrics(self, name: str | None = None, recursive: bool = False, run_type: str | None = None,
                    populate: bool = False) -> dict[str, Any]:
        """Metrics in Azure's shape: one value, a list, or a dict of column lists; recursive adds children by id.
        Every point this process logged before the call is in it (the read API waits for them, bounded)."""
        runs = [self.id] + ([w.run_id for w in _descendants(self.id)] if recursive else [])
        return self._api().get(run_path(self.id, "metrics"), name=name, recursive=str(bool(recursive)).lower(),
                               headers=self._em.metrics_token(runs))

    def get_children(self, recursive: bool = False) -> list["Run"]:
        self._em.flush(10)
        rows = self._api().get(run_path(self.id, "children"), recursive=str(bool(recursive)).lower())
        kids = _with_local(rows, [w for w in (_descendants(self.id) if recursive else local.local_rows(parent=self.id))],
                           self._em)
        return [self.experiment._run_from_row(r) for r in sorted(kids, key=lambda r: r.get("created_time") or "")]

    def get_portal_url(self) -> str:
        """The run's page: Grafana's Run dashboard when `grafana_url` is set, else the read API's page."""
        return self._settings.portal_url(self.id)

    def wait_for_completion(self, show_output: bool = False, wait_post_processing: bool = False,
                            raise_on_error: bool = True, timeout: float | None = None,
                            poll_interval: float = 0.5) -> dict[str, Any]:
        """Wait until the run reaches a terminal state and return get_details(). With show_output, print
        the driver logs as they arrive (prefixed by rank when there are several), then a summary.
        A Failed run raises RunFailedError unless raise_on_error=False."""
        from .watch import wait

        return wait(self, show_output, raise_on_error, timeout, poll_interval)

    def get_details_with_logs(self) -> dict[str, Any]:
        """get_details() plus "logFiles": the content of each of the run's log files."""
        details = self.get_details()
        api = self._api()
        details["logFiles"] = {f["name"]: api.text(run_path(self.id, "files", f['name']))
                               for f in api.get(run_path(self.id, "files")) if f["kind"] == "log"}
        return details

    def get_file_names(self) -> list[str]:
        """Every file of the run: its log files and the files stored for it."""
        return [f["name"] for f in self._api().get(run_path(self.id, "files"))]

    def restore_snapshot(self, snapshot_id: str | None = None, path: str | os.PathLike | None = None) -> str:
        """Write the snapshot of a submitted run's source directory as a zip; return its path."""
        from .files import fetch

        return str(fetch(self._api(), run_path(self.id, "snapshot"), path, f"{self.id}-snapshot.zip")[0])

    def __repr__(self) -> str:
        return (f"Run(Experiment: {self.experiment.name},\nId: {self.id},\nType: {self.run_type},\n"
                f"Status: {self._status},\nPortal: {self.get_portal_url()})")


class Experiment:
    def __init__(self, workspace: "Workspace", name: str, **kwargs: Any):
        if not isinstance(name, str) or not _EXPERIMENT_NAME.match(name):
            raise MetricError(
                f"Experiment: name {name!r} must be 1-255 characters: letters, digits, '_', '-' or '.', "
                "starting with a letter or digit")
        self.workspace = workspace
        self.name = name

    def start_logging(self, *args: Any, display_name: str | None = None, outputs: Any = None,
                      snapshot_directory: Any = None, **kwargs: Any) -> Run:
        """Start an interactive run; what it leaves in `outputs` (default ./outputs) becomes its files."""
        return Run._start(self, display_name=display_name, tags=kwargs.get("tags"),
                          properties=kwargs.get("properties"), outputs=outputs or "./outputs")

    def get_runs(self, type: str | None = None, tags: Any = None, properties: Any = None,
                 include_children: bool = False) -> list[Run]:
        params: dict[str, Any] = {"experiment": self.name, "include_children": str(include_children).lower()}
        if type:
            params["run_type"] = type
        if tags is not None:
            params["tag"] = V.filter_param(tags)
        if properties is not None:
            params["property"] = V.filter_param(properties)
        em = get_emitter(self.workspace.settings)
        mine = local.local_rows(experiment=self.name)
        if mine:
            em.flush(10)
        rows = self.workspace.read_api().get("/api/runs", **params)
        if mine:  # this process's runs as they are now, whether the store has caught up or not
            api = self.workspace.read_api()
            stored = {r["run_id"]: r for r in api.get("/api/runs", run_id=[w.run_id for w in mine],
                                                      include_children="true", limit=len(mine))}
            ids = {w.run_id for w in mine}
            rows = [r for r in rows if r["run_id"] not in ids]
            tag_f = params.get("tag")
            prop_f = params.get("property")
            for w in mine:
                row = local.overlay(stored.get(w.run_id), w, this_source().key, em.last_state_seq(w.run_id))
                if row is not None and local.matches(row, tag_f, prop_f, type, include_children):
                    rows.append(row)
            rows.sort(key=lambda r: r.get("created_time") or "", reverse=True)
        return [self._run_from_row(r) for r in rows]

    def _run_from_row(self, row: Mapping[str, Any]) -> Run:
        exp = self if row.get("experiment") in (None, self.name) else Experiment(self.workspace, row["experiment"])
        run = Run(exp, row["run_id"], _fetch=False)
        run._apply_details(row)
        return run

    def submit(self, config: Any, tags: Mapping[str, Any] | None = None, **kwargs: Any) -> Run:
        """Submit a ScriptRunConfig: the run is Queued at once and carried out by a local launcher process
        (docs/submitting.md), which snapshots nothing itself: the source directory is snapshotted here."""
        from .config import ConfigError, ScriptRunConfig
        from .launcher import spawn
        from .snapshot import make_snapshot

        unknown = set(kwargs) - {"display_name"}
        if unknown:
            raise TypeError(f"Experiment.submit() got unexpected argument(s): {', '.join(sorted(unknown))}")
        if not isinstance(config, ScriptRunConfig):
            raise ConfigError(f"Experiment.submit: config must be a ScriptRunConfig, not {type(config).__name__}")
        settings = self.workspace.settings
        config.check(settings)
        run_id = new_run_id(self.name)
        run_dir = settings.home / "runs" / run_id
        source = Path(config.source_directory).expanduser().resolve()
        info = make_snapshot(source, run_dir / "snapshot.zip", settings.snapshot_max_bytes)
        props = {names.SCRIPT_PROPERTY: config.script, names.SOURCE_DIRECTORY_PROPERTY: str(source),
                 names.NODES_PROPERTY: str(config.node_count),
                 names.PROCESSES_PER_NODE_PROPERTY: str(config.process_count_per_node),
                 names.PROCESSES_PROPERTY: str(config.node_count * config.process_count_per_node),
                 names.SNAPSHOT_FILES_PROPERTY: str(info.files), names.SNAPSHOT_BYTES_PROPERTY: str(info.bytes)}
        run = Run._start(self, display_name=kwargs.get("display_name") or Path(config.script).stem, run_id=run_id,
                         run_type=SCRIPT_RUN, status=RunStatus.Queued, compute_target=config.compute_target,
                         properties=props, tags=dict(tags) if tags else None, heartbeats=False)
        spec = {"run_id": run_id, "experiment": self.name, "config": dataclasses.asdict(config),
                "source_directory": str(source), "snapshot": str(run_dir / "snapshot.zip"),
                "snapshot_info": dataclasses.asdict(info), "submitted_ts": time.time()}
        # The Queued record goes out before the launcher's first event, so the run's history is in order.
        run.flush(10.0)
        run.launcher = spawn(run_dir, spec, settings)
        return run

    def __repr__(self) -> str:
        return f"Experiment(Name: {self.name}, Workspace: {self.workspace.name})"


class Workspace:
    """Where runs are sent and read. Without a config file: the embedded stack under RUNWATCH_HOME."""

    def __init__(self, name: str = "local", settings: Settings | None = None, **overrides: Any):
        self.name = name
        self.settings = settings or Settings.load(**overrides)
        self._client: ApiClient | None = None

    @classmethod
    def from_config(cls, path: str | os.PathLike | None = None, **overrides: Any) -> "Workspace":
        cfg_path = Path(path) if path else _find_config()
        data: dict[str, Any] = {}
        if cfg_path is not None:
            try:
                data = json.loads(Path(cfg_path).read_text())
            except (OSError, ValueError) as exc:
                raise RunwatchError(f"Workspace.from_config: cannot read {cfg_path}: {exc}") from None
            if cfg_path.is_dir():
                raise RunwatchError(f"Workspace.from_config: {cfg_path} is a directory")
        name = data.pop("name", data.pop("workspace_name", "local"))
        settings = {k: v for k, v in data.items() if k in Settings.__dataclass_fields__}
        settings.update(overrides)
        return _cached_workspace(name, Settings.load(**settings))

    def read_api(self) -> ApiClient:
        """The client of this workspace's read API (what every reader of runs, metrics and files asks)."""
        if self._client is None:
            self._client = ApiClient(self.settings)
        return self._client

    def __repr__(self) -> str:
        return f"Workspace(name={self.name!r}, home={str(self.settings.home)!r})"


_WORKSPACES: dict[tuple, Workspace] = {}


def _cached_workspace(name: str, settings: Settings) -> Workspace:
    key = (name, settings)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = Workspace(name, settings)
    return ws


def _find_config() -> Path | None:
    here = Path.cwd()
    for d in (here, *here.parents):
        p = d / ".runwatch" / "config.json"
        if p.is_file():
            return p
    return None


def _read_record(workspace: "Workspace", run_id: str, em: Emitter | None = None, **params: Any) -> dict[str, Any]:
    """A run's record from the read API, with this process's writes laid over it until the store has them."""
    w = local.written(run_id)
    em = em or get_emitter(workspace.settings)
    if w is not None:
        em.flush(10)  # this process's writes are numbered (and on their way) before the read
    try:
        row = workspace.read_api().get(run_path(run_id), **params)
    except NotFound:
        row = None
    merged = local.overlay(row, w, this_source().key, em.last_state_seq(run_id))
    if merged is None:
        raise NotFound(f"no run {run_id!r}")
    return merged


def _descendants(run_id: str) -> list[local.Written]:
    out, frontier = [], [run_id]
    while frontier:
        kids = [w for p in frontier for w in local.local_rows(parent=p)]
        out += kids
        frontier = [w.run_id for w in kids]
    return out


def _with_local(rows: list[dict[str, Any]], mine: list[local.Written], em: Emitter) -> list[dict[str, Any]]:
    """Stored rows, with this process's runs among them as it wrote them (and those not stored yet added)."""
    by_id = {r["run_id"]: r for r in rows}
    for w in mine:
        row = local.overlay(by_id.get(w.run_id), w, this_source().key, em.last_state_seq(w.run_id))
        if row is not None:
            by_id[w.run_id] = row
    return list(by_id.values())


def _reserve_steps(counter, n: int) -> int:
    """Take n consecutive steps from a name's counter; return the first."""
    start = next(counter)
    for _ in range(n - 1):
        next(counter)
    return start


__all__ = ["Workspace", "Experiment", "Run", "MetricError", "MetricTypeError"]

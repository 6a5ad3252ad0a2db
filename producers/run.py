"""Workspace, Experiment and Run: Azure ML v1's logging names, feeding the background emitter."""

from __future__ import annotations

import dataclasses
import getpass
import io
import itertools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runwatch.core import names
from runwatch.core.client import ApiClient, run_path
from runwatch.core.errors import FileError, NotApplicable, NotFound, RunwatchError
from runwatch.core.events import (
    DType,
    Heartbeat,
    MetricKind,
    MetricName,
    PropertiesSet,
    RunCreated,
    RunStatus,
    RunUpdated,
    StatusChanged,
    TagsSet,
    this_source,
)
from runwatch.core.names import SCRIPT_RUN, new_run_id
from runwatch.core.settings import Settings
from runwatch.core.states import ACTIVE, ALL, TERMINAL

from . import local
from . import values as V
from .buffer import columns
from .emitter import Emitter, get_emitter, on_fork
from .values import MetricError, MetricTypeError

log = logging.getLogger("runwatch")
_time = time.time
_FLOAT, _STR = DType.float, DType.str
#: Run ids a lookup of this process's runs sends at once (each up to ~60 characters in the URL).
LOOKUP_CHUNK = 100
_EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}$")


class Run:
    """A run of an experiment. `Run(experiment, run_id)` reopens an existing run."""

    def __init__(self, experiment: "Experiment", run_id: str, outputs: Any = None, **kwargs: Any):
        self.experiment = experiment
        self.id = run_id
        self._settings = experiment.workspace.settings
        self._offline = bool(kwargs.pop("_offline", False))
        self._display_name = kwargs.pop("display_name", None)
        self._description: str | None = kwargs.pop("description", None)
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
        props.setdefault(names.USER_PROPERTY, _user())
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
            run._watch_system()
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
            run._watch_system()
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
        if known is None:
            self._record_columns(name, cols)
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
        if known is None:
            self._record_columns(name, tuple(cols))
        start = _reserve_steps(self._counter(name, MetricKind.table), len(next(iter(cols.values()))))
        for p in prepared:
            self._append_column(p, start)

    # -- metrics: helpers -------------------------------------------------------------------
    def _record_columns(self, name: str, cols: tuple[str, ...]) -> None:
        """A table's columns in their logged order, kept as a run property (names.columns_property): reads
        give them in this order, as Azure does. runwatch's own property: it does not count against the
        run's limits of tags and properties."""
        self._row_columns[name] = cols
        key = names.columns_property(name)
        if key not in self._properties:
            value = json.dumps(list(cols), ensure_ascii=False)
            self._properties[key] = value
            self._written().properties[key] = value
            self._emit(PropertiesSet(properties={key: value}))

    def _claim(self, name: str, kind: MetricKind, call: str) -> None:
        known = self._kind_of.get(name)
        if known is kind:
            return
        V.check_name(name, call, self._settings.max_name_length)
        if names.is_system(name):
            raise MetricError(f"{call}: {name!r}: names under {names.SYSTEM_PREFIX!r} are runwatch's system "
                              "metrics (docs/system-metrics.md); choose another name")
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

    # -- system metrics (producers/system.py) ---------------------------------------------------
    def _watch_system(self) -> None:
        if self._settings.system_metrics and self._settings.system_metrics_interval > 0:
            from .system import monitor

            monitor(self._settings.system_metrics_interval).watch(self)

    def _log_system(self, figures: Mapping[str, float], step: int) -> None:
        """One system sample (the sampling thread calls this): numbers at the sample's index as step, outside the
        user's names and their limit."""
        t = _time()
        buf = self._buffer
        wake = False
        for name, value in figures.items():
            wake |= buf.add_number((self._entry(name, MetricKind.scalar, "", _FLOAT), step, t, float(value)))
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
        from . import capture, system

        system.unwatch(self.id)

        capture.stop(self.id)  # its last lines go out before its status
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
        self._display_name = d.get("display_name") or self._display_name
        self._description = d.get("description") or self._description
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
        """The run's details in Azure ML's shape (docs/azureml.md lists each key), and runwatch's own few."""
        d = self._record(gaps="true")
        self._apply_details(d)
        props = d.get("properties") or {}
        out = {
            "runId": d["run_id"], "experiment": d["experiment"], "status": d["status"],
            "displayName": d.get("display_name"), "description": d.get("description"),
            "parentRunId": d.get("parent_run_id"), "target": d.get("compute_target"),
            "startTimeUtc": d.get("start_time"), "endTimeUtc": d.get("end_time"),
            "durationSeconds": d.get("duration_s"),
            "properties": _public(props),
            "tags": d.get("tags", {}), "error": d.get("error"), "runType": d.get("run_type"),
            "inputDatasets": [], "outputDatasets": [], "submittedBy": props.get(names.USER_PROPERTY),
            "runDefinition": _run_definition(props, d.get("compute_target")),
            "logFiles": {f: self._settings_url(f) for f in self._log_file_names()},
            "droppedPoints": d.get("dropped_points", 0),
            # events this run's processes numbered that never reached the store (docs/reliability.md)
            "missingEvents": sum((d.get("missing_events") or {}).values()),
        }
        if d["status"] not in TERMINAL:
            del out["endTimeUtc"]  # as in Azure: a run that is not over has no end time
        return out

    def _file_list(self) -> list[dict[str, Any]]:
        """The run's files as the read API lists them; none yet for a run of this process not stored yet."""
        try:
            return self._api().get(run_path(self.id, "files"))
        except NotFound:
            w = local.written(self.id)
            if w is not None and w.created_here:
                return []
            raise

    def _log_file_names(self) -> list[str]:
        names_ = [f["name"] for f in self._file_list() if f["kind"] == "log"]
        for rank in range(int((self._properties or {}).get(names.PROCESSES_PROPERTY) or 0)):
            if names.driver_log(rank) not in names_:  # a process that printed nothing still has its log
                names_.append(names.driver_log(rank))
        return sorted(names_)

    def _settings_url(self, name: str) -> str:
        base = self._settings.resolved_api_url() or ""
        return base.rstrip("/") + run_path(self.id, "files", name)

    def get_tags(self) -> dict[str, str | None]:
        return dict(self._record()["tags"])

    def get_properties(self) -> dict[str, str]:
        """The run's properties; runwatch's own bookkeeping (`_runwatch.*`) is kept out, as in get_details()."""
        return _public(self._record()["properties"])

    def get_metrics(self, name: str | None = None, recursive: bool = False, run_type: str | None = None,
                    populate: bool = False, include_system: bool = False) -> dict[str, Any]:
        """Metrics in Azure's shape: one value, a list, or a dict of column lists; recursive adds descendants by
        id (`run_type`: only those of that type). Every point this process logged before the call is in it
        (the read API waits for them, bounded). `populate` is accepted and changes nothing (no metric here
        refers to external data). System metrics (`system/...`, docs/system-metrics.md) are in it with
        `include_system=True`, or when `name` names one."""
        runs = [self.id] + ([w.run_id for w in _descendants(self.id)] if recursive else [])
        try:
            got = self._api().get(run_path(self.id, "metrics"), name=name, recursive=str(bool(recursive)).lower(),
                                  system=str(bool(include_system)).lower(), headers=self._em.metrics_token(runs))
        except NotFound:
            w = local.written(self.id)
            if w is None or not w.created_here:
                raise
            got = {rid: {} for rid in runs} if recursive else {}  # started here, nothing logged, not stored yet
        if recursive:  # descendants started here that the store does not list as children yet
            for rid in runs:
                if rid not in got:
                    try:
                        got[rid] = self._api().get(run_path(rid, "metrics"), name=name,
                                                   system=str(bool(include_system)).lower())
                    except NotFound:
                        got[rid] = {}
        if recursive and run_type is not None:
            keep = {self.id} | {r.id for r in self.get_children(recursive=True) if r.run_type == run_type}
            got = {rid: m for rid, m in got.items() if rid in keep}
        # tables this process logged: their columns in its order even before the store has the property
        for rid, metrics in (got.items() if recursive else [(self.id, got)]):
            w = local.written(rid)
            if w is not None and isinstance(metrics, dict):
                names.order_tables(metrics, w.properties)
        return got

    def get_children(self, recursive: bool = False) -> list["Run"]:
        self._em.flush(10)
        rows = self._api().get(run_path(self.id, "children"), recursive=str(bool(recursive)).lower())
        mine = _descendants(self.id) if recursive else local.local_rows(parent=self.id)
        kids = _with_local(rows, mine, self._em)
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
        """get_details() with "logFiles" holding the content of each of the run's log files (a process that
        printed nothing has its driver log, empty)."""
        details = self.get_details()
        api = self._api()
        logs = {}
        for name in details["logFiles"]:
            try:
                logs[name] = api.text(run_path(self.id, "files", name))
            except NotFound:
                logs[name] = ""
        details["logFiles"] = logs
        return details

    def get_all_logs(self, destination: str | os.PathLike | None = None) -> list[str]:
        """Download every log file of the run under `destination` (default ./logs); return their paths."""
        from .files import download, target_in

        out = Path(destination) if destination is not None else Path.cwd() / "logs"
        written = []
        for name in self._log_file_names():
            target = target_in(out, name)
            try:
                download(self._api(), self.id, name, target)
            except NotFound:  # the driver log of a process that printed nothing
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("")
            written.append(str(target))
        return written

    def get_file_names(self) -> list[str]:
        """Every file of the run: its log files and the files stored for it."""
        return [f["name"] for f in self._file_list()]

    def restore_snapshot(self, snapshot_id: str | None = None, path: str | os.PathLike | None = None) -> str:
        """Write the snapshot of a submitted run's source directory as a zip; return its path. `path` is the
        directory it goes in (default: here), or the zip's own path when it ends in .zip."""
        from .files import fetch

        target = Path(path) if path is not None else Path.cwd()
        if target.suffix.lower() != ".zip":
            target.mkdir(parents=True, exist_ok=True)
        try:
            return str(fetch(self._api(), run_path(self.id, "snapshot"), target, f"{self.id}-snapshot.zip")[0])
        except NotFound:
            # submitted from this machine and not stored yet (its launcher stores it once it starts)
            mine = self._settings.home / "runs" / self.id / "snapshot.zip"
            if not mine.is_file():
                raise
            out = target if target.suffix.lower() == ".zip" else target / f"{self.id}-snapshot.zip"
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(mine, out)
            return str(out)

    # -- Azure ML's other names -------------------------------------------------------------------
    @property
    def display_name(self) -> str | None:
        return self._display_name

    @display_name.setter
    def display_name(self, value: str | None) -> None:
        V.check_name(value, "display_name", self._settings.max_tag_name_length, "display_name")
        self._display_name = value
        self._written().display_name = value
        self._emit(RunUpdated(display_name=value))

    @property
    def description(self) -> str | None:
        return self._description

    @description.setter
    def description(self, value: str | None) -> None:
        if not isinstance(value, str):
            raise MetricTypeError(f"description must be a string, not {type(value).__name__}")
        if len(value) > self._settings.max_tag_value_length:
            raise MetricError(f"description is {len(value):,} characters long; at most "
                              f"{self._settings.max_tag_value_length:,} (setting max_tag_value_length)")
        V.check_text(value, "description", "description")
        self._description = value
        self._written().description = value
        self._emit(RunUpdated(description=value))

    @property
    def type(self) -> str:
        """Azure's name of the run's type: azureml.scriptrun for a submitted run, interactive, ..."""
        return self.run_type

    @property
    def name(self) -> str | None:
        return self._display_name

    @property
    def parent(self) -> "Run | None":
        return Run.get(self.experiment.workspace, self.parent_id) if self.parent_id else None

    def remove_tags(self, tags: Iterable[str] | str) -> None:
        """Remove these tags from the run (a name it does not have is ignored)."""
        keys = [tags] if isinstance(tags, str) else list(tags)
        for k in keys:
            if not isinstance(k, str):
                raise MetricTypeError(f"remove_tags: a tag name must be a string, not {type(k).__name__}")
        gone = [k for k in keys if k in self._tags]
        w = self._written()
        for k in keys:
            self._tags.pop(k, None)
            w.tags.pop(k, None)
            w.removed_tags.add(k)
        self._chars = None
        if gone or keys:
            self._emit(TagsSet(tags={}, removed=keys))

    def create_children(self, count: int | None = None, tag_key: str | None = None,
                        tag_values: Iterable[str] | None = None) -> list["Run"]:
        """Start several child runs at once: `count` of them, or one per value in `tag_values`, each tagged
        `tag_key` = value (Azure ML's create_children)."""
        if tag_values is not None:
            values = [str(v) for v in tag_values]
            if not tag_key:
                raise MetricError("create_children: tag_values needs tag_key")
            if count is not None and count != len(values):
                raise MetricError(f"create_children: count is {count} but there are {len(values)} tag values")
        else:
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise MetricError(f"create_children: count must be a positive integer, not {count!r}")
            values = [None] * count
        kids = []
        for v in values:
            rid = f"{self.id}_{next(self._child_count)}"
            kids.append(Run._start(self.experiment, parent=self, run_id=rid, offline=self._offline,
                                   tags={tag_key: v} if tag_key is not None and v is not None else None))
        return kids

    @staticmethod
    def list(experiment: "Experiment", type: str | None = None, tags: Any = None, properties: Any = None,
             status: str | None = None, include_children: bool = False) -> list["Run"]:
        """The runs of an experiment, newest first, as Azure ML's Run.list filters them."""
        return experiment.get_runs(type=type, tags=tags, properties=properties, include_children=include_children,
                                   status=status)

    @staticmethod
    def list_by_compute(compute: Any, type: str | None = None, tags: Any = None, properties: Any = None,
                        status: str | None = None, workspace: "Workspace | None" = None) -> list["Run"]:
        """The runs on a compute target (its name, or an object with a `name`), newest first, of every
        experiment; as Azure's, the active ones unless `status` says otherwise."""
        ws = workspace or getattr(compute, "workspace", None) or Workspace.from_config()
        target = compute if isinstance(compute, str) else getattr(compute, "name", None)
        if not isinstance(target, str):
            raise MetricError(f"list_by_compute: compute must be a compute target's name, not {type_name(compute)}")
        params: dict[str, Any] = {"compute_target": target, "include_children": "true"}
        params["status"] = [str(getattr(status, "value", status))] if status is not None else list(ACTIVE)
        _filters(params, type, tags, properties)
        rows = ws.read_api().get("/api/runs", **params)
        return [Experiment(ws, r["experiment"])._run_from_row(r) for r in rows]

    @property
    def properties(self) -> dict[str, str]:
        """The run's properties as last read or written here (get_properties() reads them again)."""
        return _public(self._properties)

    @property
    def tags(self) -> dict[str, str | None]:
        """The run's tags as last read or written here (get_tags() reads them again)."""
        return dict(self._tags)

    def get_detailed_status(self) -> dict[str, Any]:
        """The status, and for a Failed run its error (Azure's shape: {"status", "details"})."""
        d = self._record()
        self._apply_details(d)
        err = d.get("error") or {}
        return {"status": d["status"], "details": err.get("message") if isinstance(err, dict) else err}

    def submit_child(self, config: Any, tags: Mapping[str, Any] | None = None, **kwargs: Any) -> "Run":
        """Submit a ScriptRunConfig as a child of this run (its launcher, logs and snapshot as submit's)."""
        return self.experiment._submit(config, tags, parent=self, **kwargs)

    def log_accuracy_table(self, name: str, value: Any, description: str = "") -> None:
        """Azure's accuracy table (a dict or its JSON text), kept as a string metric holding its JSON."""
        self._log_json("log_accuracy_table", name, value)

    def log_confusion_matrix(self, name: str, value: Any, description: str = "") -> None:
        """Azure's confusion matrix (a dict or its JSON text), kept as a string metric holding its JSON."""
        self._log_json("log_confusion_matrix", name, value)

    def log_predictions(self, name: str, value: Any, description: str = "") -> None:
        """Azure's regression predictions (a dict or its JSON text), kept as a string metric holding its JSON."""
        self._log_json("log_predictions", name, value)

    def log_residuals(self, name: str, value: Any, description: str = "") -> None:
        """Azure's regression residuals (a dict or its JSON text), kept as a string metric holding its JSON."""
        self._log_json("log_residuals", name, value)

    def _log_json(self, call: str, name: str, value: Any) -> None:
        if isinstance(value, str):
            try:
                json.loads(value)
            except ValueError as exc:
                raise MetricError(f"run.{call}: {name!r}: the value is not JSON ({exc})") from None
            text = value
        else:
            try:
                text = json.dumps(value, allow_nan=False, ensure_ascii=False)
            except (TypeError, ValueError) as exc:
                raise MetricTypeError(f"run.{call}: {name!r}: the value must be JSON ({exc})") from None
        self.log(name, text)

    def get_snapshot_id(self) -> str | None:
        """A submitted run's snapshot id (the run's own id: one snapshot a run); None for other runs."""
        return self.id if self.run_type == SCRIPT_RUN or names.SNAPSHOT_FILES_PROPERTY in self._properties else None

    # Azure calls with no meaning here: a clear error at the call (docs/azureml.md says why, call by call)
    def register_model(self, *args: Any, **kwargs: Any) -> Any:
        raise NotApplicable("Run.register_model", "runwatch has no model registry; upload the model with "
                            "run.upload_file() or keep it under ./outputs, and tag the run")

    def get_secret(self, name: str) -> Any:
        raise NotApplicable("Run.get_secret", "there is no workspace key vault; read secrets from the environment "
                            "(ScriptRunConfig.environment_variables)")

    def get_secrets(self, secrets: Any) -> Any:
        raise NotApplicable("Run.get_secrets", "there is no workspace key vault; read secrets from the environment")

    def get_environment(self) -> Any:
        raise NotApplicable("Run.get_environment", "a run uses the Python environment it was started in; there "
                            "are no registered environments")

    def _repr_html_(self) -> str:
        """A notebook shows a table of the run with a link to it, as Azure ML's did."""
        from html import escape

        url = self.get_portal_url()
        rows = [("Experiment", escape(self.experiment.name)), ("Id", escape(self.id)), ("Type", escape(self.run_type)),
                ("Status", escape(str(self._status))),
                ("Details Page", f'<a href="{escape(url)}" target="_blank" rel="noopener">Link to the run</a>')]
        return ("<table style='width:100%'><tr>" + "".join(f"<th>{k}</th>" for k, _ in rows) + "</tr><tr>"
                + "".join(f"<td>{v}</td>" for _, v in rows) + "</tr></table>")

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

    @property
    def id(self) -> str:
        """Experiments are named, not numbered, here: the name is the id."""
        return self.name

    def refresh(self) -> None:
        """Azure reloads the experiment's record; here an experiment is its runs, always read fresh."""

    def start_logging(self, *args: Any, display_name: str | None = None, outputs: Any = None,
                      snapshot_directory: Any = None, capture_output: bool | None = None, **kwargs: Any) -> Run:
        """Start an interactive run; what it leaves in `outputs` (default ./outputs) becomes its files.
        `capture_output` (default: on in a script, off in a notebook) tees what the process prints, its logging
        records and its warnings into the run's logs until the run ends (producers/capture.py)."""
        run = Run._start(self, display_name=display_name, tags=kwargs.get("tags"),
                         properties=kwargs.get("properties"), outputs=outputs or "./outputs")
        from . import capture

        if capture_output is None:
            capture_output = self.workspace.settings.captures_output(capture.in_notebook())
        if capture_output:
            capture.start(run)
        return run

    def get_runs(self, type: str | None = None, tags: Any = None, properties: Any = None,
                 include_children: bool = False, status: str | None = None) -> list[Run]:
        """The experiment's runs, newest first: those of one `type`, with these `tags` / `properties` (a name,
        a list of names, or a dict of name: value), in this `status`; children only with `include_children`.
        This process's own runs are as it last wrote them, stored or not."""
        params: dict[str, Any] = {"experiment": self.name, "include_children": str(include_children).lower()}
        statuses = None
        if status is not None:
            statuses = [str(getattr(status, "value", status))]
            unknown = set(statuses) - set(ALL)
            if unknown:
                raise MetricError(f"get_runs: status {statuses[0]!r} is not a run status; one of {', '.join(ALL)}")
            params["status"] = statuses
        _filters(params, type, tags, properties)
        em = get_emitter(self.workspace.settings)
        mine = local.local_rows(experiment=self.name)
        if mine:
            em.flush(10)
        rows = self.workspace.read_api().get("/api/runs", **params)
        mine = local.unconfirmed(mine, em.last_state_seq)
        if mine:  # this process's runs as they are now, whether the store has caught up or not
            api = self.workspace.read_api()
            stored = {}
            for i in range(0, len(mine), LOOKUP_CHUNK):  # ids in the query string: a URL of at most ~8 KB
                chunk = [w.run_id for w in mine[i:i + LOOKUP_CHUNK]]
                stored.update((r["run_id"], r) for r in api.get("/api/runs", run_id=chunk, include_children="true",
                                                                limit=len(chunk)))
            ids = {w.run_id for w in mine}
            rows = [r for r in rows if r["run_id"] not in ids]
            tag_f = params.get("tag")
            prop_f = params.get("property")
            for w in mine:
                row = local.overlay(stored.get(w.run_id), w, this_source().key, em.last_state_seq(w.run_id))
                if row is not None and local.matches(row, tag_f, prop_f, type, include_children, statuses):
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
        return self._submit(config, tags, **kwargs)

    def _submit(self, config: Any, tags: Mapping[str, Any] | None = None, parent: Run | None = None,
                **kwargs: Any) -> Run:
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
        run_id = f"{parent.id}_{next(parent._child_count)}" if parent is not None else new_run_id(self.name)
        run_dir = settings.home / "runs" / run_id
        source = Path(config.source_directory).expanduser().resolve()
        info = make_snapshot(source, run_dir / "snapshot.zip", settings.snapshot_max_bytes)
        props = {names.SCRIPT_PROPERTY: config.script, names.SOURCE_DIRECTORY_PROPERTY: str(source),
                 names.ARGUMENTS_PROPERTY: json.dumps([str(a) for a in config.arguments], ensure_ascii=False),
                 names.NODES_PROPERTY: str(config.node_count),
                 names.PROCESSES_PER_NODE_PROPERTY: str(config.process_count_per_node),
                 names.PROCESSES_PROPERTY: str(config.node_count * config.process_count_per_node),
                 names.SNAPSHOT_FILES_PROPERTY: str(info.files), names.SNAPSHOT_BYTES_PROPERTY: str(info.bytes)}
        run = Run._start(self, display_name=kwargs.get("display_name") or Path(config.script).stem, run_id=run_id,
                         parent=parent,
                         run_type=SCRIPT_RUN, status=RunStatus.Queued, compute_target=config.compute_target,
                         properties=props, tags=dict(tags) if tags else None, heartbeats=False)
        spec = {"run_id": run_id, "experiment": self.name, "config": config.to_spec(),
                "source_directory": str(source), "snapshot": str(run_dir / "snapshot.zip"),
                "snapshot_info": dataclasses.asdict(info), "submitted_ts": time.time()}
        # The Queued record goes out before the launcher's first event, so the run's history is in order.
        run.flush(10.0)
        run.launcher = spawn(run_dir, spec, settings)
        return run

    @staticmethod
    def list(workspace: "Workspace", experiment_name: str | None = None, view_type: str = "ActiveOnly",
             tags: Any = None) -> list["Experiment"]:
        """The workspace's experiments (those with at least one run), by name; `experiment_name` picks one.
        `view_type` and `tags` are Azure's and have nothing to filter here (experiments are not archived
        or tagged in runwatch)."""
        rows = workspace.read_api().get("/api/experiments")
        found = {r["name"] for r in rows} | {w.experiment for w in local.local_rows()}
        return [Experiment(workspace, n) for n in sorted(found) if experiment_name in (None, n)]

    def get_portal_url(self) -> str:
        """The experiment's page: Grafana's Runs dashboard when `grafana_url` is set, else the read API's page."""
        return self.workspace.settings.experiment_url(self.name)

    def _repr_html_(self) -> str:
        """A notebook shows a table of the experiment with a link to it, as Azure ML's did."""
        from html import escape

        return (f"<table style='width:100%'><tr><th>Name</th><th>Workspace</th><th>Report Page</th></tr><tr>"
                f"<td>{escape(self.name)}</td><td>{escape(self.workspace.name)}</td>"
                f"<td><a href=\"{escape(self.get_portal_url())}\" target=\"_blank\" rel=\"noopener\">"
                "Link to the experiment</a></td></tr></table>")

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

    # Azure's coordinates of a workspace; here they name the machine's stack (docs/azureml.md).
    subscription_id = "local"
    resource_group = "local"
    location = "local"

    @classmethod
    def get(cls, name: str = "local", **_: Any) -> "Workspace":
        """Azure's lookup by name (subscription and resource group have no meaning here): the configured one."""
        ws = cls.from_config()
        return ws if ws.name == name else _cached_workspace(name, ws.settings)

    def get_run(self, run_id: str) -> Run:
        return Run.get(self, run_id)

    @property
    def experiments(self) -> dict[str, "Experiment"]:
        """The experiments that have runs, by name."""
        return {e.name: e for e in Experiment.list(self)}

    @property
    def compute_targets(self) -> dict[str, int]:
        """The configured compute targets (setting compute_targets): name -> process slots."""
        return dict(self.settings.compute())

    def write_config(self, path: str | os.PathLike | None = None, file_name: str | None = None) -> Path:
        """Write `.runwatch/config.json` (what from_config finds) naming this workspace."""
        target = Path(path or ".") / ".runwatch" / (file_name or "config.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"name": self.name}, indent=2) + "\n")
        return target

    def get_details(self) -> dict[str, Any]:
        return {"name": self.name, "location": self.location, "subscriptionId": self.subscription_id,
                "resourceGroup": self.resource_group, "home": str(self.settings.home),
                "apiUrl": self.settings.resolved_api_url()}

    def __repr__(self) -> str:
        return f"Workspace(name={self.name!r}, home={str(self.settings.home)!r})"


_WORKSPACES: dict[tuple, Workspace] = {}


def _cached_workspace(name: str, settings: Settings) -> Workspace:
    key = (name, settings)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = Workspace(name, settings)
    return ws


def _filters(params: dict[str, Any], run_type: str | None, tags: Any, properties: Any) -> None:
    """Azure's run filters (a type; tags and properties as a name, names, or name: value) as read API params."""
    if run_type:
        params["run_type"] = run_type
    if tags is not None:
        params["tag"] = V.filter_param(tags)
    if properties is not None:
        params["property"] = V.filter_param(properties)


def _public(properties: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in properties.items() if not k.startswith(names.INTERNAL_PREFIX)}


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


def type_name(x: Any) -> str:
    return type(x).__name__


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in the environment and no passwd entry (some containers)
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def _run_definition(props: Mapping[str, str], target: str | None) -> dict[str, Any]:
    """get_details()'s "runDefinition" in Azure's shape, from what submit() recorded (empty keys for an
    interactive run, which has no definition in Azure either beyond its target)."""
    nodes = props.get(names.NODES_PROPERTY)
    per_node = props.get(names.PROCESSES_PER_NODE_PROPERTY)
    return {"script": props.get(names.SCRIPT_PROPERTY), "target": target,
            "sourceDirectory": props.get(names.SOURCE_DIRECTORY_PROPERTY),
            "arguments": json.loads(props[names.ARGUMENTS_PROPERTY]) if names.ARGUMENTS_PROPERTY in props else [],
            "nodeCount": int(nodes) if nodes else 1,
            "processCountPerNode": int(per_node) if per_node else 1}


def _reserve_steps(counter, n: int) -> int:
    """Take n consecutive steps from a name's counter; return the first."""
    start = next(counter)
    for _ in range(n - 1):
        next(counter)
    return start


__all__ = ["Workspace", "Experiment", "Run", "MetricError", "MetricTypeError"]

"""RunDetails(run).show(): a run, live, in Jupyter (anywidget + uPlot, shipped with the package: nothing is
fetched from the network at run time). Outside Jupyter, `print(RunDetails(run))` gives a text summary.

The Python side polls the read API every `refresh_interval` seconds (10 by default) in a daemon
thread, until the run reaches a terminal state; the browser side only draws the synced state.
"""

from __future__ import annotations

import base64
import json
import math
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .core.client import run_path
from .core.errors import NotFound, RunwatchError
from .core.names import DRIVER_LOG_PREFIX, is_system
from .core.states import TERMINAL

STATIC = Path(__file__).resolve().parent / "static"
MAX_POINTS = 500          # per chart: longer series are reduced to min/max per bucket
TAIL_LINES = 50
MAX_IMAGE_BYTES = 2 << 20


def _bucketed(values: list[float]) -> tuple[list[float], list[float], list[float]]:
    """(x, min, max) with at most MAX_POINTS buckets of consecutive steps; a spike survives as a max."""
    n = len(values)
    if n <= MAX_POINTS:
        clean = [v if isinstance(v, (int, float)) and math.isfinite(v) else None for v in values]
        return list(range(n)), clean, clean
    width = math.ceil(n / MAX_POINTS)
    xs, lo, hi = [], [], []
    for start in range(0, n, width):
        chunk = [v for v in values[start:start + width] if isinstance(v, (int, float)) and math.isfinite(v)]
        xs.append(start)
        lo.append(min(chunk) if chunk else None)
        hi.append(max(chunk) if chunk else None)
    return xs, lo, hi


def _stored_or(api, path: str, default: Any) -> Any:
    """What the read API has at `path`; `default` while the run (this process's, just started) is not stored."""
    try:
        return api.get(path)
    except NotFound:
        return default


def _fnum(v: Any) -> Any:
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


#: Seconds a finished run is still refreshed while what it shows changes (its last data being stored).
SETTLE_SECONDS = 15.0


def _settled_view(state: dict[str, Any]) -> str:
    return json.dumps({k: state.get(k) for k in ("status", "metrics", "children", "best_child", "files")},
                      sort_keys=True, default=str)


class RunDetails:
    """A live view of one run: status, elapsed time, properties, tags, metrics, log files, child runs."""

    def __init__(self, run: Any, refresh_interval: float = 10.0, child_metric: str | None = None,
                 goal: str = "min"):
        if goal not in ("min", "max"):
            raise ValueError(f"RunDetails: goal must be 'min' or 'max', not {goal!r}")
        self.run = run
        self.refresh_interval = float(refresh_interval)
        self.child_metric = child_metric
        self.goal = goal
        self.selected_file: str | None = None
        self._file_chosen = False  # the user picked the log file (the selector), so refreshes keep it
        self.state: dict[str, Any] = {"run_id": run.id, "status": run.status or "", "polling": False}
        self.refreshes = 0
        self._widget = None
        self._image_cache: dict[str, tuple[str | None, str]] = {}  # name -> (sha256, data URI)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # -- what is shown ----------------------------------------------------------------------
    def refresh(self) -> dict[str, Any]:
        """Ask the read API once and update the state (and the widget, when shown). Never raises for
        an unreachable stack: the state says so, and the next refresh tries again."""
        with self._lock:
            try:
                state = self._collect()
            except RunwatchError as exc:
                state = dict(self.state, stack_error=str(exc))
            state["refresh_interval"] = self.refresh_interval
            state["refreshed_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            state["polling"] = self._thread is not None and not self._stop.is_set() and not state.get("terminal")
            self.state = state
            self.refreshes += 1
            if self._widget is not None:
                self._widget.state = state
            return state

    def _collect(self) -> dict[str, Any]:
        api = self.run.experiment.workspace.read_api()
        rid = self.run.id
        try:
            d = self.run.fetch_state()  # with every write this process made (read-your-writes)
        except NotFound:
            return {"run_id": rid, "status": "NotStarted", "terminal": False, "stack_error": None,
                    "note": "the run is not stored yet", "metrics": [], "files": [], "children": [],
                    "portal_url": self.run.get_portal_url()}
        status = d["status"]
        start = d.get("start_time") or d.get("created_time")
        elapsed = d.get("duration_s")
        if elapsed is None and start:
            elapsed = time.time() - datetime.fromisoformat(start).timestamp()
        state: dict[str, Any] = {
            "run_id": rid, "experiment": d["experiment"], "display_name": d.get("display_name"), "status": status,
            "terminal": status in TERMINAL, "elapsed_s": round(elapsed, 1) if elapsed is not None else None,
            "start_time": d.get("start_time"), "end_time": d.get("end_time"), "error": d.get("error"),
            "properties": {k: v for k, v in d.get("properties", {}).items() if not k.startswith("_runwatch.")},
            "tags": d.get("tags", {}), "portal_url": self.run.get_portal_url(), "stack_error": None,
        }
        listed = self.run._file_list()
        state["metrics"] = self._metrics(api, rid, {f["name"]: f.get("sha256") for f in listed if f["kind"] == "file"})
        files = [f["name"] for f in listed if f["kind"] == "log"]
        state["files"] = files
        if self.selected_file not in files or not self._file_chosen:
            # the default, until the user picks one: the first driver log (rank 0's, once it is there)
            driver = [f for f in files if f.startswith(DRIVER_LOG_PREFIX)]
            self.selected_file = (driver or files or [None])[0]
        state["selected_file"] = self.selected_file
        state["log_tail"] = ([ln["line"] for ln in api.get(run_path(rid, "logs"), file=self.selected_file,
                                                             tail=TAIL_LINES)["lines"]]
                             if self.selected_file else [])
        state.update(self._children(api, rid))
        return state

    def _metrics(self, api, rid: str, stored: dict[str, str | None]) -> list[dict[str, Any]]:
        aggs = _stored_or(api, run_path(rid, "aggregates"), {})
        kinds = {k.split(".")[0] if v["kind"] in ("row", "table") else k: v["kind"] for k, v in aggs.items()}
        # every point this process logged before (read-your-writes); system metrics after the run's own
        values = self.run.get_metrics(include_system=True)
        out = []
        for name in sorted(values, key=lambda n: (is_system(n), n)):
            v = values[name]
            # the stored kind, or what this process logged it as (its aggregates may not be stored yet)
            mine = getattr(self.run, "_kind_of", {}).get(name)
            kind = kinds.get(name) or (getattr(mine, "value", mine) if mine is not None else None) or (
                "table" if isinstance(v, dict) else "scalar")
            m: dict[str, Any] = {"name": name, "kind": kind, "system": is_system(name)}
            if kind == "image":
                last = v[-1] if isinstance(v, list) else v
                m["file"] = last
                m["image"] = self._image(api, rid, last, stored.get(last))
            elif isinstance(v, dict):  # rows and tables: the first column (as logged) against the second
                cols = list(v)
                x, y = cols[0], cols[1] if len(cols) > 1 else cols[0]
                pairs = sorted((a, b) for a, b in zip(v[x], v[y]) if isinstance(a, (int, float))
                               and isinstance(b, (int, float)))
                m.update(x_label=x, y_label=y, x=[_fnum(a) for a, _ in pairs], y=[_fnum(b) for _, b in pairs])
            elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                m["x"], m["min"], m["max"] = _bucketed(v)
                m["points"] = len(v)
                m["last"] = _fnum(v[-1])
            else:
                m["value"] = _fnum(v[-1] if isinstance(v, list) and v else v)
            out.append(m)
        return out

    def _image(self, api, rid: str, name: str, sha256: str | None) -> str | None:
        """The image as a data URI; fetched again only when its checksum changed (not on every refresh)."""
        import io

        cached = self._image_cache.get(name)
        if cached is not None and cached[0] == sha256 and sha256:
            return cached[1]
        buf = io.BytesIO()
        try:
            n = api.download(run_path(rid, "files", name), buf)
        except RunwatchError:
            return None
        if n > MAX_IMAGE_BYTES:
            return None
        mime = "image/png" if name.lower().endswith(".png") else "image/jpeg" if name.lower().endswith(
            (".jpg", ".jpeg")) else "image/svg+xml" if name.lower().endswith(".svg") else "image/png"
        uri = f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()
        self._image_cache[name] = (sha256, uri)
        return uri

    def _children(self, api, rid: str) -> dict[str, Any]:
        stored = {k["run_id"]: k for k in _stored_or(api, run_path(rid, "children"), [])}
        kids = []
        for r in self.run.get_children():  # this process's children as it wrote them, stored or not
            k = dict(stored.get(r.id) or {"run_id": r.id, "duration_s": None})
            k.update(status=r._status, display_name=r.display_name)
            kids.append(k)
        if not kids:
            return {"children": [], "child_metric": None, "child_metric_options": [], "best_child": None}
        aggs = {k["run_id"]: api.get(run_path(k['run_id'], "aggregates")) for k in kids}
        options = sorted({name for per in aggs.values() for name, a in per.items() if a["kind"] in ("scalar", "list")})
        metric = self.child_metric if self.child_metric in options else (options[0] if options else None)
        rows, best, best_value = [], None, None
        for k in kids:
            agg = aggs[k["run_id"]].get(metric) if metric else None
            value = None if agg is None else (agg["min"] if self.goal == "min" else agg["max"])
            rows.append({"run_id": k["run_id"], "name": k.get("display_name") or k["run_id"], "status": k["status"],
                         "duration_s": k.get("duration_s"), "value": _fnum(value),
                         "last": _fnum(agg["last"]) if agg else None})
            if isinstance(value, (int, float)) and math.isfinite(value) and (
                    best_value is None or (value < best_value if self.goal == "min" else value > best_value)):
                best, best_value = k["run_id"], value
        return {"children": rows, "child_metric": metric, "child_metric_options": options, "best_child": best,
                "goal": self.goal}

    # -- polling ----------------------------------------------------------------------------------
    def start(self) -> "RunDetails":
        """Refresh now and then every `refresh_interval` seconds until the run is in a terminal state."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name="runwatch-rundetails", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        settled_by = None
        last = None
        while not self._stop.is_set():
            state = self.refresh()
            if state.get("terminal") and not state.get("stack_error"):
                # the run is over; its last points, files and children's aggregates may still be on their way to
                # the store: refreshed until two refreshes agree (at most SETTLE_SECONDS), then polling ends
                now = time.monotonic()
                settled_by = settled_by or now + SETTLE_SECONDS
                shown = _settled_view(state)
                if shown == last or now >= settled_by:
                    break
                last = shown
            self._stop.wait(self.refresh_interval)
        self._stop.set()
        self.state = dict(self.state, polling=False)
        if self._widget is not None:
            self._widget.state = self.state

    @property
    def polling(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- display ------------------------------------------------------------------------------------
    def widget(self):
        """The anywidget (built once); its `state` trait is what the browser draws."""
        if self._widget is None:
            self._widget = _widget_class()(state=self.state)

            def chosen(change):  # the front end picked a log file or a child metric
                if change["name"] == "selected_file":
                    self.selected_file = change["new"]
                    self._file_chosen = True
                else:
                    self.child_metric = change["new"]
                threading.Thread(target=self.refresh, daemon=True).start()

            self._widget.observe(chosen, names=["selected_file", "child_metric"])
        return self._widget

    def show(self) -> None:
        """Display the widget in Jupyter and keep it current; elsewhere print the text summary."""
        from .producers.capture import in_notebook

        if not in_notebook():
            self.refresh()
            print(self)
            return
        from IPython.display import display

        display(self.widget())
        self.start()

    def __str__(self) -> str:
        s = self.state if self.refreshes else self.refresh()
        lines = [f"Run {s['run_id']}" + (f" ({s['display_name']})" if s.get("display_name") else "")
                 + (f", experiment {s['experiment']}" if s.get("experiment") else "")]
        if s.get("stack_error"):
            lines.append(f"  the stack cannot be reached: {s['stack_error']}")
        lines.append(f"  status: {s.get('status')}" + (f", {s['elapsed_s']:.1f} s" if s.get("elapsed_s") else ""))
        if s.get("error"):
            lines.append(f"  error: {s['error'].get('message') if isinstance(s['error'], dict) else s['error']}")
        for key in ("tags", "properties"):
            if s.get(key):
                lines.append(f"  {key}: " + ", ".join(f"{k}={v}" if v is not None else k for k, v in s[key].items()))
        for m in s.get("metrics", []):
            if "points" in m:
                finite = [v for v in m["min"] if v is not None]
                lines.append(f"  {m['name']}: {m['points']} values, last {m['last']}, "
                             f"min {min(finite) if finite else 'n/a'}")
            elif "x" in m:
                lines.append(f"  {m['name']}: {len(m['x'])} rows of {m['x_label']} and {m['y_label']}")
            elif m["kind"] == "image":
                lines.append(f"  {m['name']}: image {m['file']}")
            else:
                lines.append(f"  {m['name']}: {m['value']}")
        if s.get("files"):
            lines.append(f"  log files: {len(s['files'])}; last lines of {s['selected_file']}:")
            lines += [f"    {ln}" for ln in s.get("log_tail", [])[-5:]]
        if s.get("children"):
            lines.append(f"  child runs: {len(s['children'])}" + (
                f"; best by {s['goal']} {s['child_metric']}: {s['best_child']}" if s.get("best_child") else ""))
        lines.append(f"  {s.get('portal_url', '')}")
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))


_WIDGET_CLASS = None


def _widget_class():
    """The anywidget class, made on first use (importing runwatch never imports ipywidgets)."""
    global _WIDGET_CLASS
    if _WIDGET_CLASS is None:
        from .core.errors import require

        anywidget = require("anywidget", "RunDetails(run) in a notebook", "notebook")
        import traitlets

        esm, css = front_end()

        class RunDetailsWidget(anywidget.AnyWidget):
            _esm = esm
            _css = css
            state = traitlets.Dict().tag(sync=True)
            selected_file = traitlets.Unicode(allow_none=True).tag(sync=True)
            child_metric = traitlets.Unicode(allow_none=True).tag(sync=True)

        _WIDGET_CLASS = RunDetailsWidget
    return _WIDGET_CLASS


def front_end() -> tuple[str, str]:
    """(JavaScript module, CSS) of the widget, as Jupyter receives them."""
    return ((STATIC / "uPlot.iife.min.js").read_text() + "\n" + (STATIC / "rundetails.js").read_text(),
            (STATIC / "uPlot.min.css").read_text() + "\n" + (STATIC / "rundetails.css").read_text())

"""The read API (HTTP, JSON), served by the worker that owns the ClickHouse data (docs/api.md)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import html
import json
import logging
import math
import socket
import time
from typing import Any, Callable
from urllib.parse import quote

import ujson
from aiohttp import web

from runwatch.api.filestore import FileError, FileStore, safe_name
from runwatch.api.queries import Queries, counts
from runwatch.core.names import STACK_HEADER
from runwatch.core.settings import Settings

log = logging.getLogger("runwatch.api")


def _dumps(value: Any) -> str:
    # NaN and ±inf are written as JSON's NaN / Infinity tokens, which Python's json (and so the SDK) reads back.
    # ujson writes what json.dumps writes (floats shortest round-trip, non-ASCII escaped, other types through
    # `str`; only a Decimal, which no query returns, comes out as a number), 3× faster: json.dumps of the
    # cross-run query's 600 KB took 3.8 ms of its ~17 ms of CPU (docs/performance.md)
    return ujson.dumps(value, default=str, escape_forward_slashes=False)


def _bool(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes", "on")


class ReadApi:
    def __init__(self, queries: Queries, health: Callable[[], dict[str, Any]], settings: Settings,
                 files: FileStore, snapshots: FileStore, live=None, sink=None, run_tail=None):
        self.queries = queries
        #: the worker's live tail (runwatch/api/live.py): `live.pending(run_ids)`; None reads what is stored only
        self.live = live
        #: the worker's run tail (runwatch/api/live.py RunTail): a run's record shows the events of the `runs`
        #: topic the processors and the sink have not stored yet; None: what is stored only
        self.run_tail = run_tail
        #: the worker's sink, when it runs in this process: it tells producers what of theirs is stored
        self.sink = sink
        self.health_fn = health
        self.settings = settings
        self.token = settings.api_token
        self.files = files
        self.snapshots = snapshots
        self.pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="runwatch-api")
        self._allowed_hosts = {"localhost", "127.0.0.1", "::1", settings.api_host, socket.gethostname()} | {
            h.strip().lower() for h in (settings.api_allowed_hosts or "").split(",") if h.strip()}
        self.app = web.Application(middlewares=[self._errors])
        self.app.on_response_prepare.append(self._identity)
        r = self.app.router
        r.add_get("/api/health", self.health)
        r.add_get("/api/experiments", self.experiments)
        r.add_get("/api/runs", self.runs)
        r.add_get("/api/runs/{run_id}", self.run)
        r.add_get("/api/runs/{run_id}/metrics", self.metrics)
        r.add_get("/api/runs/{run_id}/children", self.children)
        r.add_get("/api/runs/{run_id}/aggregates", self.run_aggregates)
        r.add_get("/api/runs/{run_id}/history", self.history)
        r.add_get("/api/runs/{run_id}/files", self.file_list)
        r.add_get("/api/runs/{run_id}/files/{name:.+}", self.file_get)
        r.add_put("/api/runs/{run_id}/files/{name:.+}", self.file_put)
        r.add_get("/api/runs/{run_id}/logs", self.logs)
        r.add_get("/api/runs/{run_id}/snapshot", self.snapshot_get)
        r.add_put("/api/runs/{run_id}/snapshot", self.snapshot_put)
        r.add_get("/api/sources/{src}/stored", self.source_stored)
        r.add_get("/api/alerts", self.alerts)
        r.add_get("/api/dead-letters", self.dead_letters)
        r.add_get("/api/compute", self.compute)
        r.add_get("/api/compute/{name}", self.compute_one)
        r.add_get("/runs/{run_id}", self.run_page)
        r.add_get("/experiments/{name}", self.experiment_page)
        self.runner: web.AppRunner | None = None

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        host = _host_name(request.headers.get("Host", ""))
        if not self._host_ok(host):
            # a web page whose name was rebound to 127.0.0.1 sends its own Host (DNS rebinding): not served
            return _error(f"Host {host!r} is not one this read API serves (setting api_allowed_hosts)", 421)
        if self.token and request.path.startswith("/api/") and request.path != "/api/health":
            if not hmac.compare_digest(request.headers.get("Authorization", "").encode(),
                                       f"Bearer {self.token}".encode()):
                return _error("a valid bearer token is required", 401)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _error(exc.reason or exc.text or "error", exc.status)
            raise
        except (ValueError, TypeError) as exc:
            return _error(str(exc), 400)
        except LookupError as exc:
            return _error(str(exc.args[0]) if exc.args else "not found", 404)
        except Exception as exc:  # the API stays up; the caller gets the reason
            log.exception("read API error on %s", request.path)
            return _error(f"{type(exc).__name__}: {exc}", 500)

    def _host_ok(self, host: str) -> bool:
        allowed = self._allowed_hosts
        return "*" in allowed or host in allowed

    async def _q(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.pool, lambda: fn(*args, **kwargs))

    def _json(self, value: Any, status: int = 200) -> web.Response:
        return web.json_response(value, status=status, dumps=_dumps)

    async def _identity(self, request: web.Request, response: web.StreamResponse) -> None:
        # every answer names the stack it comes from: a client of another home's stack says so (core/client.py)
        if self.settings.stack_id:
            response.headers[STACK_HEADER] = self.settings.stack_id

    async def start(self, host: str, port: int, fallback: bool = False) -> int:
        """Listen on `port` (with `fallback`, on any free port when it is taken); return the port listened on."""
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        try:
            await web.TCPSite(self.runner, host, port).start()
        except OSError:
            if not fallback:
                raise
            log.warning("read API: port %d is taken; listening on another one", port)
            await web.TCPSite(self.runner, host, 0).start()
        return int(self.runner.addresses[-1][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # -- handlers ---------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        info = self.health_fn()
        if request.query.get("rows", "true").lower() == "false":  # readiness polls skip the ClickHouse query
            return self._json(info)
        try:
            storage = await self._q(self.queries.storage)
            info["rows"] = counts(storage)
            if _bool(request.query.get("storage")):
                info["storage"] = storage
        except Exception as exc:
            info["rows"] = {}
            info["clickhouse_error"] = str(exc)
        return self._json(info)

    async def experiments(self, request: web.Request) -> web.Response:
        return self._json(await self._q(self.queries.experiments))

    async def runs(self, request: web.Request) -> web.Response:
        q = request.query
        limit = _int_param(q, "limit", 1000, 1, 100_000)
        rows = await self._q(
            self.queries.runs, experiment=q.get("experiment"), status=q.getall("status", []) or None,
            compute_target=q.get("compute_target"), tags=q.getall("tag", []) or None,
            properties=q.getall("property", []) or None, parent=q.get("parent"),
            include_children=_bool(q.get("include_children")), run_type=q.get("run_type"),
            metrics=q.getall("metric", []) or None, sort_metric=q.get("sort_metric"), sort=q.get("sort", "max"),
            order=q.get("order", "desc"), limit=limit, run_ids=q.getall("run_id", []) or None)
        return self._json(rows)

    async def _get_run(self, run_id: str, stored: bool = False) -> dict[str, Any]:
        run = await self._q(self.queries.run, run_id)
        if self.run_tail is not None and not stored:
            run = self.run_tail.overlay(run_id, run)
        if run is None:
            raise LookupError(f"no run {run_id!r}")
        return run

    async def _require_run(self, run_id: str, wait: float = 0.0, stored: bool = False) -> None:
        """404 for an unknown run, by the cheapest lookup (no FINAL): for endpoints that found nothing of it.
        `wait`: seconds to give a run created a moment ago (its first event still on its way to the store)."""
        deadline = time.monotonic() + min(max(wait, 0.0), 30.0)
        if not stored and self.run_tail is not None and self.run_tail.overlay(run_id, None) is not None:
            return  # created a moment ago: its record is in the runs topic, not stored yet (the run tail)
        while not await self._q(self.queries.run_exists, run_id):
            if time.monotonic() >= deadline:
                raise LookupError(f"no run {run_id!r}")
            await asyncio.sleep(0.05)

    async def run(self, request: web.Request) -> web.Response:
        # stored=true: the stored record alone, without what the run tail has seen of the `runs` topic
        run = await self._get_run(request.match_info["run_id"], stored=_bool(request.query.get("stored")))
        if _bool(request.query.get("gaps")):
            run["missing_events"] = await self._q(self.queries.missing_events, run["run_id"])
        return self._json(run)

    async def _after(self, request: web.Request) -> None:
        """A read that names the writer's last metric batches (X-Runwatch-After) is answered once they are
        stored, at most `read_wait` seconds later (read-your-writes: producers/local.py)."""
        raw = request.headers.get("X-Runwatch-After")
        if not raw:
            return
        try:
            after = json.loads(raw)
            src, wanted = str(after["src"]), {str(k): int(v) for k, v in after.get("metrics", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError("header X-Runwatch-After must be {\"src\": ..., \"metrics\": {run: seq}}") from None
        deadline = time.monotonic() + self.settings.read_wait
        while wanted and time.monotonic() < deadline:
            have = await self._q(self._stored_seqs, src, list(wanted))
            wanted = {r: s for r, s in wanted.items() if s > have.get(r, -1)}
            if wanted:
                await asyncio.sleep(0.01)

    def _stored_seqs(self, src: str, runs: list[str]) -> dict[str, int]:
        if self.sink is not None:
            return {r: v["metrics"] for r, v in self.sink.stored(src, runs).items()}
        return self.queries.stored_seqs(src, runs)

    async def metrics(self, request: web.Request) -> web.Response:
        run_id, recursive = request.match_info["run_id"], _bool(request.query.get("recursive"))
        await self._after(request)
        # stored=true: what ClickHouse holds, nothing from the live tail (and the run is not watched)
        live = None if self.live is None or _bool(request.query.get("stored")) else self.live.pending
        found = await self._q(self.queries.metrics, run_id, request.query.get("name"), recursive, live,
                              _bool(request.query.get("system")))
        if not (any(found.values()) if recursive else found):
            # no points: an unknown run is a 404. Looked up only then: a widget or a probe polling a live
            # run's metrics would pay a second query per poll (docs/performance.md)
            await self._require_run(run_id, stored=live is None and self.live is not None)
        return self._json(found)

    async def run_aggregates(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        found = (await self._q(self.queries.aggregates, [run_id])).get(run_id, {})
        if not found:
            await self._require_run(run_id)
        return self._json(found)

    async def children(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        found = await self._q(self.queries.children, run_id, _bool(request.query.get("recursive")))
        if not found:
            await self._require_run(run_id)
        return self._json(found)

    async def history(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        found = await self._q(self.queries.history, run_id)
        if not found:
            await self._require_run(run_id)
        return self._json(found)

    # -- files and logs ----------------------------------------------------------------------
    async def file_list(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        logs = await self._q(self.queries.log_files, run_id)
        events = await self._q(self.queries.run_files, run_id)
        # the store has the bytes; the pipeline's FileStored events say where each file came from
        stored = [dict(m, kind="file", origin=events.get(m["name"], {}).get("origin"))
                  for m in await self._q(self.files.list, run_id)]
        if not logs and not stored:
            await self._require_run(run_id)  # an unknown run is a 404; a known one may have no files yet
        return self._json(logs + stored)

    async def logs(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        q = request.query
        file = q.get("file")
        if not file:
            raise ValueError("give the log file: ?file=azureml-logs/70_driver_log_0.txt")
        limit = _int_param(q, "limit", 1000, 1, 100_000)
        tail = _int_param(q, "tail", None, 0, 1_000_000)
        after = _int_param(q, "after_seq", -1, -1, 1 << 62)
        found = await self._q(self.queries.log_lines, run_id, file, after, limit, tail)
        if not found["lines"]:
            await self._require_run(run_id)
        return self._json(found)

    async def file_get(self, request: web.Request) -> web.StreamResponse:
        run_id, name = request.match_info["run_id"], request.match_info["name"]
        try:
            path = await self._q(self.files.path, run_id, name)
        except LookupError:
            path = None
        if path is not None:
            meta = self.files.meta(run_id, name)
            return web.FileResponse(path, headers={**_served_as(meta["content_type"], name),
                                                   "X-Content-SHA256": meta.get("sha256", "")})
        first = await self._q(self.queries.log_lines, run_id, name, -1, 10_000)
        if not first["lines"]:
            await self._require_run(run_id)
            raise LookupError(f"run {run_id} has no file {name!r}")
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        page = first
        while page["lines"]:  # a log file is its lines in order, streamed page by page
            await resp.write("".join(ln["line"] + "\n" for ln in page["lines"]).encode())
            page = await self._q(self.queries.log_lines, run_id, name, page["next_seq"], 10_000)
        await resp.write_eof()
        return resp

    async def file_put(self, request: web.Request) -> web.Response:
        return await self._upload(request, self.files, request.match_info["name"], self.settings.max_file_bytes)

    async def snapshot_get(self, request: web.Request) -> web.FileResponse:
        run_id = request.match_info["run_id"]
        try:
            path = await self._q(self.snapshots.path, run_id, "snapshot.zip")
        except LookupError:
            await self._require_run(run_id)
            raise LookupError(f"run {run_id} has no snapshot (only submitted runs have one)") from None
        return web.FileResponse(path, headers={"Content-Type": "application/zip", "X-Content-Type-Options": "nosniff"})

    async def snapshot_put(self, request: web.Request) -> web.Response:
        return await self._upload(request, self.snapshots, "snapshot.zip", self.settings.snapshot_max_bytes)

    async def _upload(self, request: web.Request, store: FileStore, name: str, max_bytes: int) -> web.Response:
        run_id = request.match_info["run_id"]
        safe_name(name)  # a name the store would refuse is refused before the run is looked up
        # files go only to runs that exist; the SDK gives a run it created a moment ago a few seconds to be stored
        await self._require_run(run_id, wait=_float_header(request, "X-Runwatch-Wait"))
        if request.content_length is not None and request.content_length > max_bytes:
            raise FileError(f"file {name!r} is {request.content_length} bytes; the limit is {max_bytes}")

        async def body():
            async for chunk in request.content.iter_chunked(1 << 20):
                yield chunk
            if request.content_length is not None and request.content.total_bytes != request.content_length:
                raise FileError(f"upload of {name!r} was cut: {request.content.total_bytes} of "
                                f"{request.content_length} bytes arrived")

        meta = await store.write(run_id, name, body(), sha256=request.headers.get("X-Content-SHA256"),
                                 max_bytes=max_bytes, content_type=request.headers.get("Content-Type"))
        return self._json(meta, status=201)

    async def source_stored(self, request: web.Request) -> web.Response:
        """What of one source's events the sink has stored, per run and topic (the producers of the embedded
        stack keep what they sent until it is: producers/emitter.py)."""
        if self.sink is None:
            raise LookupError("this read API runs without the sink: it cannot tell what is stored")
        src, runs = request.match_info["src"], request.query.getall("run", [])
        stored = await self._q(self.sink.stored, src, runs)
        return self._json({"incarnation": self.sink.incarnation, "caught_up": self.sink.caught_up(), "runs": stored})

    async def alerts(self, request: web.Request) -> web.Response:
        limit = _int_param(request.query, "limit", 100, 1, 10_000)
        return self._json(await self._q(self.queries.alerts, request.query.get("run_id"), limit))

    async def dead_letters(self, request: web.Request) -> web.Response:
        """Events no stage could take, newest first, with the reason (of one run: ?run_id=)."""
        limit = _int_param(request.query, "limit", 100, 1, 10_000)
        return self._json(await self._q(self.queries.dead_letters, request.query.get("run_id"), limit))

    # -- compute -----------------------------------------------------------------------------
    async def compute(self, request: web.Request) -> web.Response:
        return self._json(await self._q(self.queries.compute, self.settings.compute()))

    async def compute_one(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        targets = await self._q(self.queries.compute, self.settings.compute(), name)
        if not targets:
            raise LookupError(f"no compute target {name!r}; configured: {', '.join(self.settings.compute())}")
        return self._json(targets[0])

    async def run_page(self, request: web.Request) -> web.Response:
        run = await self._get_run(request.match_info["run_id"])
        aggs = (await self._q(self.queries.aggregates, [run["run_id"]])).get(run["run_id"], {})
        e = html.escape
        rows = "".join(f"<tr><td>{e(k)}</td><td>{v['count']}</td><td>{_fmt(v['min'])}</td><td>{_fmt(v['max'])}</td>"
                       f"<td>{e(str(v['last']))}</td></tr>" for k, v in sorted(aggs.items()))
        body = (f"<html><head><title>{e(run['run_id'])}</title></head><body>"
                f"<h1>{e(run['experiment'])} / {e(run['run_id'])}</h1>"
                f"<p>Status: <b>{e(run['status'])}</b> &middot; started {e(str(run['start_time']))} &middot; "
                f"ended {e(str(run['end_time']))}</p><p>Tags: {e(json.dumps(run['tags']))}</p>"
                f"<table border=1><tr><th>metric</th><th>count</th><th>min</th><th>max</th><th>last</th></tr>{rows}"
                f"</table></body></html>")
        return web.Response(text=body, content_type="text/html")


    async def experiment_page(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        runs = await self._q(self.queries.runs, experiment=name, limit=1000)
        if not runs:
            raise LookupError(f"no experiment {name!r} (an experiment exists once it has a run)")
        e = html.escape
        rows = "".join(f"<tr><td><a href=\"/runs/{quote(r['run_id'], safe='')}\">{e(r['run_id'])}</a></td>"
                       f"<td>{e(r['status'])}</td><td>{e(str(r['display_name'] or ''))}</td>"
                       f"<td>{e(str(r['start_time']))}</td></tr>" for r in runs)
        body = (f"<html><head><title>{e(name)}</title></head><body><h1>{e(name)}</h1>"
                f"<table border=1><tr><th>run</th><th>status</th><th>name</th><th>started</th></tr>{rows}</table>"
                "</body></html>")
        return web.Response(text=body, content_type="text/html")


def _error(message: str, status: int) -> web.Response:
    """Every error the API gives has this shape: {"error": what is wrong, "code": the HTTP status}."""
    return web.json_response({"error": message, "code": status}, status=status)


def _int_param(q, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = q.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer from {lo} to {hi}, not {raw!r}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer from {lo} to {hi}, not {value}")
    return value


def _float_header(request: web.Request, name: str) -> float:
    try:
        return float(request.headers.get(name, "0"))
    except ValueError:
        raise ValueError(f"header {name} must be a number of seconds") from None


def _host_name(host: str) -> str:
    """The name in a Host header, without its port ("[::1]:8765" -> "::1")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


#: Content types a stored file is served back as; anything else (text/html, image/svg+xml: a page, a script) is
#: served as bytes to save, never as something a browser would run.
SAFE_TYPES = frozenset({"text/plain", "text/csv", "application/json", "application/zip", "application/gzip",
                        "application/x-tar", "application/octet-stream", "image/png", "image/jpeg", "image/gif",
                        "image/webp", "image/bmp", "application/pdf"})


def _served_as(content_type: str, name: str) -> dict[str, str]:
    base = (content_type or "").split(";")[0].strip().lower()
    headers = {"X-Content-Type-Options": "nosniff"}
    if base in SAFE_TYPES:
        headers["Content-Type"] = content_type
    else:
        from urllib.parse import quote

        headers["Content-Type"] = "application/octet-stream"
        headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(name.rsplit('/', 1)[-1])}"
    return headers


def _fmt(x: Any) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}" if isinstance(x, float) else str(x)

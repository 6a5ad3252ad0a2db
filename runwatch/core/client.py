"""The read API's client: what the SDK readers and the CLI use to ask the stack."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from .errors import ApiError, NotFound, StackMismatch, StackNotRunning
from .names import STACK_HEADER
from .settings import Settings

if TYPE_CHECKING:
    import httpx


class ApiClient:
    def __init__(self, settings: Settings, timeout: float = 30.0):
        self.settings = settings
        self.timeout = timeout
        self._client: httpx.Client | None = None
        self._base: str | None = None

    def _http(self) -> httpx.Client:
        import httpx  # on first use: a training process that only logs never pays its import (60 ms)

        base = self.settings.resolved_api_url()
        if not base:
            raise StackNotRunning(None)
        if self._client is None or base != self._base:
            if self._client is not None:
                self._client.close()
            headers = {"Authorization": f"Bearer {self.settings.api_token}"} if self.settings.api_token else {}
            self._client = httpx.Client(base_url=base, timeout=self.timeout, headers=headers)
            self._base = base
        return self._client

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; no answer at all means the stack is not running."""
        import httpx

        try:
            resp = self._http().request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise StackNotRunning(self._base) from exc
        self._check_identity(resp)
        return resp

    def _check_identity(self, resp: httpx.Response) -> None:
        check_identity(self.settings, resp, self._base)

    def get(self, path: str, headers: dict[str, str] | None = None, **params: Any) -> Any:
        return _result(self._request("GET", path, params=_clean(params), headers=headers or None))

    def post(self, path: str, body: Any) -> Any:
        return _result(self._request("POST", path, json=body))

    def upload(self, path: str, source, size: int | None = None, sha256: str | None = None,
               content_type: str | None = None) -> Any:
        """PUT a file's bytes; `source` is a binary file object or an iterator of bytes (streamed, not loaded)."""
        headers = {}
        if sha256:
            headers["X-Content-SHA256"] = sha256
        if content_type:
            headers["Content-Type"] = content_type
        if size is not None:
            headers["Content-Length"] = str(size)
        # a run created a moment ago may still be on its way to the store: the API waits for it, this long
        headers["X-Runwatch-Wait"] = "10"
        body = iter(lambda: source.read(1 << 20), b"") if hasattr(source, "read") else source
        return _result(self._request("PUT", path, content=body, headers=headers, timeout=None))

    def download(self, path: str, fh) -> int:
        """GET a file's bytes into the binary file object `fh`, streamed; return the number of bytes.
        When the server sends the file's checksum (X-Content-SHA256) the bytes are checked against it."""
        import httpx

        n = 0
        digest = hashlib.sha256()
        try:
            with self._http().stream("GET", path, timeout=None) as resp:
                self._check_identity(resp)
                if resp.status_code >= 400:
                    resp.read()
                    _result(resp)
                expected = resp.headers.get("X-Content-SHA256")
                for chunk in resp.iter_bytes(1 << 20):
                    fh.write(chunk)
                    digest.update(chunk)
                    n += len(chunk)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise StackNotRunning(self._base) from exc
        if expected and digest.hexdigest() != expected:
            raise ApiError(f"{path}: the bytes received do not match the stored checksum ({expected}); "
                           "the download was damaged and not kept")
        return n

    def text(self, path: str, **params: Any) -> str:
        resp = self._request("GET", path, params=_clean(params))
        if resp.status_code >= 400:
            _result(resp)
        return resp.text

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def run_path(run_id: str, *parts: str) -> str:
    """The read API's path of a run (and of its files): every name is URL-encoded, so that `#`, `?`, `%` and the
    like travel as part of the name."""
    from urllib.parse import quote

    return "/api/runs/" + quote(run_id, safe="") + "".join("/" + quote(p, safe="/") for p in parts)


def check_identity(settings: Settings, resp: httpx.Response, base: str | None) -> None:
    """A read API found through this home's stack record must be that stack's: after a crash, another stack
    may have taken its port, and its answers are not this home's."""
    if settings.api_url:
        return  # an address given on purpose: no record to check it against
    expected = settings.stack_record().get("stack_id")
    got = resp.headers.get(STACK_HEADER)
    if expected and got != expected:
        raise StackMismatch(
            f"runwatch: the read API at {base} belongs to another runwatch stack "
            f"({got or 'one without an identity'}), not to the one recorded under {settings.home} "
            f"({expected}), which is no longer running. Start it again with `runwatch up`.")


class AsyncApi:
    """GETs on the read API from an asyncio loop (the emitter's), with the same checks as ApiClient.get; one
    connection pool for the loop's life (a client made per call cost 25 ms of TLS context each time)."""

    def __init__(self, settings: Settings, timeout: float = 5.0):
        self.settings = settings
        self.timeout = timeout
        self._client = None
        self._base: str | None = None

    async def get(self, path: str, **params: Any) -> Any:
        import httpx

        base = self.settings.resolved_api_url()
        if not base:
            raise StackNotRunning(None)
        if self._client is None or base != self._base:
            await self.close()
            headers = {"Authorization": f"Bearer {self.settings.api_token}"} if self.settings.api_token else {}
            self._client = httpx.AsyncClient(base_url=base, timeout=self.timeout, headers=headers, verify=False
                                             if base.startswith("http://") else True)
            self._base = base
        try:
            resp = await self._client.get(path, params=_clean(params))
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise StackNotRunning(base) from exc
        except httpx.HTTPError as exc:
            raise ApiError(f"read API: {type(exc).__name__}: {exc}") from exc
        check_identity(self.settings, resp, base)
        return _result(resp)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _result(resp: httpx.Response) -> Any:
    if resp.status_code == 404:
        raise NotFound(_message(resp))
    if resp.status_code >= 400:
        raise ApiError(f"read API error {resp.status_code}: {_message(resp)}")
    # ujson reads NaN / Infinity tokens and every float to the last bit, as json.loads does, ~3× faster: a long
    # series' get_metrics() is mostly this parse (docs/performance.md). Imported here, as httpx is: the SDK
    # imports this module when a training script starts, and most never read anything back
    import ujson

    return ujson.loads(resp.content)


def _message(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("error", resp.text))
    except ValueError:
        return resp.text

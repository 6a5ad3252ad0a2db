"""Run files from the SDK: streamed uploads with a checksum, downloads checked against it, ./outputs collection.

The bytes go to the file store behind the read API; the pipeline carries only a FileStored
event naming the file, its size, content type and checksum.
"""

from __future__ import annotations

import hashlib
import io
import mimetypes
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from runwatch.core.client import ApiClient, run_path
from runwatch.core.errors import FileError
from runwatch.core.events import FileStored
from runwatch.core.names import safe_name

CHUNK = 1 << 20


def _sha256_of(fh: BinaryIO) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    for chunk in iter(lambda: fh.read(CHUNK), b""):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def upload(api: ApiClient, run_id: str, name: str, path_or_stream: Any, max_bytes: int,
           call: str = "upload_file") -> FileStored:
    """Stream one file to the store; return the event that says it is there. Raises FileError at the call."""
    try:
        name = safe_name(name)
    except FileError as exc:
        raise FileError(f"{call}: {exc}") from None
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if isinstance(path_or_stream, (str, os.PathLike)):
        path = Path(path_or_stream)
        if not path.is_file():
            raise FileError(f"{call}: {str(path)!r} is not a file")
        size = path.stat().st_size
        _check_size(call, name, size, max_bytes)
        with open(path, "rb") as fh:
            sha, _ = _sha256_of(fh)
            fh.seek(0)
            meta = api.upload(_url(run_id, name), fh, size=size, sha256=sha, content_type=content_type)
    elif hasattr(path_or_stream, "read"):
        stream = path_or_stream
        if _seekable(stream):
            start = stream.tell()
            sha, size = _sha256_of(stream)
            _check_size(call, name, size, max_bytes)
            stream.seek(start)
            meta = api.upload(_url(run_id, name), stream, size=size, sha256=sha, content_type=content_type)
        else:  # read once into a temporary file (bounded memory), then send that
            with tempfile.TemporaryFile() as tmp:
                digest, size = hashlib.sha256(), 0
                for chunk in iter(lambda: stream.read(CHUNK), b""):
                    if isinstance(chunk, str):
                        raise FileError(f"{call}: the stream must be opened in binary mode ('rb')")
                    digest.update(chunk)
                    size += len(chunk)
                    _check_size(call, name, size, max_bytes)
                    tmp.write(chunk)
                tmp.seek(0)
                sha = digest.hexdigest()
                meta = api.upload(_url(run_id, name), tmp, size=size, sha256=sha, content_type=content_type)
    else:
        raise FileError(f"{call}: path_or_stream must be a path or a binary stream, not "
                        f"{type(path_or_stream).__name__}")
    if meta.get("sha256") != sha:
        raise FileError(f"{call}: the store holds {meta.get('sha256')} for {name!r}, not what was sent ({sha})")
    return FileStored(name=name, size=size, sha256=sha, content_type=content_type)


def _seekable(stream: Any) -> bool:
    try:
        return bool(stream.seekable()) and not isinstance(stream, io.TextIOBase)
    except (AttributeError, ValueError):
        return False


def _check_size(call: str, name: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise FileError(f"{call}: {name!r} is {size} bytes; the limit is {max_bytes} (setting max_file_bytes)")


def _url(run_id: str, name: str) -> str:
    return run_path(run_id, "files", name)


def target_in(directory: str | os.PathLike, name: str) -> Path:
    """Where a run file named `name` goes under `directory`; FileError if that is outside it (a name from an
    older store, or a link inside the directory that leads out): no download ever writes elsewhere."""
    root = Path(directory).resolve()
    target = (root / name).resolve()
    if not target.is_relative_to(root):
        raise FileError(f"the run file {name!r} would be written outside {str(root)!r}; it was not downloaded")
    return target


class _Counting:
    """A file that tells `progress` the bytes written so far."""

    def __init__(self, fh, progress):
        self.fh, self.progress, self.n = fh, progress, 0

    def write(self, b) -> int:
        n = self.fh.write(b)
        self.n += len(b)
        self.progress(self.n)
        return n

    def __getattr__(self, name):
        return getattr(self.fh, name)


def fetch(api: ApiClient, url: str, target: str | os.PathLike | None, default_name: str,
          progress=None) -> tuple[Path, int]:
    """GET `url` into `target` (a file; a directory, or None for here, get `default_name`), atomically:
    a cut or damaged download leaves nothing. Returns the path and the bytes written; `progress(bytes)` is
    called as they arrive."""
    path = Path(target) if target is not None else Path.cwd()
    if path.is_dir():
        path = path / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as fh:
            n = api.download(url, _Counting(fh, progress) if progress else fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path, n


def download(api: ApiClient, run_id: str, name: str, target: str | os.PathLike | None,
             progress=None) -> tuple[Path, int]:
    """One file of the run (a stored file's checksum is verified); see `fetch` for `target`."""
    return fetch(api, _url(run_id, name), target, Path(name).name, progress)


def collect_outputs(api: ApiClient, run_id: str, outputs: Path, max_bytes: int,
                    ) -> tuple[list[FileStored], list[str]]:
    """Upload every file under `outputs` as outputs/...; return (stored, refused with the reason)."""
    stored: list[FileStored] = []
    refused: list[str] = []
    if not outputs.is_dir():
        return stored, refused
    for path in sorted(p for p in outputs.rglob("*") if p.is_file()):
        name = "outputs/" + path.relative_to(outputs).as_posix()
        try:
            ev = upload(api, run_id, name, path, max_bytes, call="outputs")
        except FileError as exc:
            refused.append(str(exc))
            continue
        stored.append(ev.model_copy(update={"origin": "outputs"}))
    return stored, refused

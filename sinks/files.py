"""The file store behind the read API: run files live on disk, never in Kafka messages or ClickHouse rows.

Uploads stream to a temporary file, are hashed on the way, and appear under their name only
after the whole body arrived and its checksum matched (an atomic rename): a cut upload leaves
nothing visible. Names are normalised so that no name can leave its run's directory.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

MAX_NAME = 1024
_META = ".runwatch-meta"
_TMP = ".runwatch-tmp"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,255}$")


class FileError(ValueError):
    """A name, size or checksum the store refuses; the message says which and why."""


def safe_name(name: Any) -> str:
    """`name` as a relative POSIX path inside a run, or FileError naming what is wrong."""
    if not isinstance(name, str) or not name:
        raise FileError(f"file name must be a non-empty string, not {name!r}")
    if "\x00" in name:
        raise FileError(f"file name {name!r} contains a NUL character")
    if len(name) > MAX_NAME:
        raise FileError(f"file name is {len(name)} characters long; at most {MAX_NAME}")
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise FileError(f"file name {name!r} is absolute; give a name relative to the run, e.g. outputs/model.pt")
    parts = [p for p in posix.split("/") if p not in ("", ".")]
    if not parts:
        raise FileError(f"file name {name!r} names no file")
    if ".." in parts:
        raise FileError(f"file name {name!r} contains '..'; names cannot leave the run's directory")
    if parts[0] in (_META, _TMP):
        raise FileError(f"file name {name!r} uses a reserved directory")
    return "/".join(parts)


def safe_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or ".." in run_id:
        raise FileError(f"run id {run_id!r} cannot name a directory")
    return run_id


class FileStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _run_dir(self, run_id: str) -> Path:
        return self.root / safe_run_id(run_id)

    def path(self, run_id: str, name: str) -> Path:
        p = self._run_dir(run_id) / safe_name(name)
        if not p.is_file():
            raise LookupError(f"run {run_id} has no file {name!r}")
        return p

    def meta(self, run_id: str, name: str) -> dict[str, Any]:
        name = safe_name(name)
        p = self.path(run_id, name)
        try:
            return json.loads((self._run_dir(run_id) / _META / (name + ".json")).read_text())
        except (OSError, ValueError):
            return {"name": name, "size": p.stat().st_size, "content_type": _content_type(name)}

    async def write(self, run_id: str, name: str, chunks: AsyncIterator[bytes], *, sha256: str | None = None,
                    max_bytes: int, content_type: str | None = None) -> dict[str, Any]:
        """Stream `chunks` into the file `name`; visible only once complete and its checksum matched."""
        name = safe_name(name)
        run_dir = self._run_dir(run_id)
        tmp_dir = run_dir / _TMP
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / uuid.uuid4().hex
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise FileError(f"file {name!r} is larger than the limit of {max_bytes} bytes")
                    digest.update(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            got = digest.hexdigest()
            if sha256 and sha256.lower() != got:
                raise FileError(f"file {name!r}: checksum mismatch (sent sha256 {sha256}, received {got}); "
                                "the upload was damaged or cut and was not kept")
            final = run_dir / name
            final.parent.mkdir(parents=True, exist_ok=True)
            meta = {"name": name, "size": size, "sha256": got, "content_type": content_type or _content_type(name)}
            meta_path = run_dir / _META / (name + ".json")
            meta_path.parent.mkdir(parents=True, exist_ok=True)
            meta_path.write_text(json.dumps(meta))
            os.replace(tmp, final)
            return meta
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, run_id: str, prefix: str = "") -> list[dict[str, Any]]:
        run_dir = self._run_dir(run_id)
        if not run_dir.is_dir():
            return []
        out = []
        for p in sorted(run_dir.rglob("*")):
            rel = p.relative_to(run_dir).as_posix()
            if not p.is_file() or rel.split("/")[0] in (_META, _TMP) or not rel.startswith(prefix):
                continue
            out.append(self.meta(run_id, rel))
        return out


def _content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"

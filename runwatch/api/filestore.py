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
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from runwatch.core.errors import FileError
from runwatch.core.names import RESERVED, run_dir_name, safe_name

__all__ = ["FileStore", "FileError", "safe_name"]

_META, _TMP = RESERVED


class FileStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _run_dir(self, run_id: str) -> Path:
        return self.root / run_dir_name(run_id)

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

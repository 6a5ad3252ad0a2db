"""Snapshots of a submitted run's source directory: a zip that honours `.amlignore` (or `.gitignore`)."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pathspec

from runwatch.core.errors import RunwatchError

IGNORE_FILES = (".amlignore", ".gitignore")
#: Never part of a snapshot: version-control internals and runwatch's own state.
ALWAYS_SKIPPED = (".git", ".runwatch", "__pycache__")


class SnapshotError(RunwatchError, ValueError):
    """The source directory cannot be snapshotted (missing, too large); the message says why."""


@dataclass
class SnapshotInfo:
    files: int
    bytes: int
    ignored: int
    ignore_file: str | None


def _spec(source: Path) -> tuple[pathspec.PathSpec | None, str | None]:
    for name in IGNORE_FILES:  # .amlignore wins over .gitignore, as in Azure ML
        p = source / name
        if p.is_file():
            return pathspec.GitIgnoreSpec.from_lines(p.read_text(errors="replace").splitlines()), name
    return None, None


def collect(source: Path) -> tuple[list[tuple[Path, str]], int, str | None]:
    """(files as (path, name in the zip), how many were ignored, the ignore file used)."""
    spec, ignore_file = _spec(source)
    files: list[tuple[Path, str]] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(source):
        rel_dir = Path(dirpath).relative_to(source).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        keep = []
        for d in sorted(dirnames):
            if d in ALWAYS_SKIPPED or (spec and spec.match_file(rel_dir + d + "/")):
                ignored += 1
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            rel = rel_dir + f
            path = Path(dirpath) / f
            if (spec and spec.match_file(rel)) or not path.is_file():
                ignored += 1
                continue
            files.append((path, rel))
    return files, ignored, ignore_file


def make_snapshot(source: str | os.PathLike, dest: Path, max_bytes: int) -> SnapshotInfo:
    """Write the snapshot of `source` to the zip `dest`; SnapshotError when it would exceed `max_bytes`."""
    source = Path(source).resolve()
    if not source.is_dir():
        raise SnapshotError(f"source_directory {str(source)!r} is not a directory")
    files, ignored, ignore_file = collect(source)
    total = sum(p.stat().st_size for p, _ in files)
    if total > max_bytes:
        biggest = sorted(files, key=lambda f: f[0].stat().st_size, reverse=True)[:3]
        raise SnapshotError(
            f"the snapshot of {source} would hold {total / 2**20:.1f} MiB, over the limit of "
            f"{max_bytes / 2**20:.0f} MiB (snapshot_max_bytes). Largest files: "
            + ", ".join(f"{n} ({p.stat().st_size / 2**20:.1f} MiB)" for p, n in biggest)
            + ". List what the run does not need in .amlignore (or .gitignore).")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path, name in files:
            zf.write(path, name)
    os.replace(tmp, dest)
    return SnapshotInfo(files=len(files), bytes=total, ignored=ignored, ignore_file=ignore_file)


def extract(snapshot: Path, dest: Path) -> int:
    """Unpack a snapshot into a run's working directory; return the number of files."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(snapshot) as zf:
        names = zf.namelist()
        zf.extractall(dest)  # our own zip: names were made relative by `collect`
    return len(names)

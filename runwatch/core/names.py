"""Run file names: the rules every stage applies, so that no name can leave its run's directory."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from .client import RunwatchError

# A submitted run's log files, in Azure ML's layout (docs/submitting.md).
DRIVER_LOG_PREFIX = "azureml-logs/70_driver_log_"
PROCESS_INFO = "azureml-logs/process_info.json"
PROCESS_STATUS = "azureml-logs/process_status.json"
LAUNCHER_LOG = "logs/azureml/launcher_azureml.log"
#: The run property where the launcher records how many lines each log file has (readers wait for them).
LOG_COUNTS_PROPERTY = "_runwatch.log_lines"
#: The run property where `submit` records how many processes the run starts.
PROCESSES_PROPERTY = "_runwatch.processes"


def driver_log(rank: int) -> str:
    return f"{DRIVER_LOG_PREFIX}{rank}.txt"


def execution_log(node: int) -> str:
    return f"azureml-logs/55_azureml-execution-{node}.txt"


def job_prep_log(node: int) -> str:
    return f"azureml-logs/65_job_prep-{node}.txt"


def job_post_log(node: int) -> str:
    return f"azureml-logs/75_job_post-{node}.txt"


MAX_NAME = 1024
RESERVED = (".runwatch-meta", ".runwatch-tmp")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,255}$")


class FileError(RunwatchError, ValueError):
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
    if parts[0] in RESERVED:
        raise FileError(f"file name {name!r} uses a reserved directory")
    return "/".join(parts)


def run_dir_name(run_id: str) -> str:
    """The directory of a run's files: its id, or a digest of it when the id could not name a directory."""
    if not isinstance(run_id, str) or not run_id:
        raise FileError(f"run id must be a non-empty string, not {run_id!r}")
    if _RUN_ID.match(run_id) and ".." not in run_id:
        return run_id
    return "id-" + hashlib.sha256(run_id.encode()).hexdigest()[:32]

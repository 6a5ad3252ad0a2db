"""Names every stage agrees on: run ids, run types, internal properties, and run file names (the rules
that keep a name inside its run's directory)."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from typing import Any

from .errors import FileError

#: The run type of a submitted run: its launcher owns its lifecycle (Azure ML's name).
SCRIPT_RUN = "azureml.scriptrun"
#: The HTTP header in which a read API names its stack (the embedded stack's id).
STACK_HEADER = "X-Runwatch-Stack"
#: Properties under this prefix are runwatch's own (shown with `--all`, hidden by default).
INTERNAL_PREFIX = "_runwatch."
#: Metric names runwatch's system metrics use (producers/system.py): refused for a user's metrics, and kept
#: out of get_metrics() unless asked for.
SYSTEM_PREFIX = "system/"


def is_system(name: str) -> bool:
    """A metric name of runwatch's system metrics (SYSTEM_PREFIX)."""
    return name.startswith(SYSTEM_PREFIX)


def new_run_id(experiment: str) -> str:
    """A new run's id: its experiment, the second it started, and 8 random hex digits."""
    return f"{experiment}_{int(time.time())}_{uuid.uuid4().hex[:8]}"


# A submitted run's log files, in Azure ML's layout (docs/submitting.md).
DRIVER_LOG_PREFIX = "azureml-logs/70_driver_log_"
PROCESS_INFO = "azureml-logs/process_info.json"
PROCESS_STATUS = "azureml-logs/process_status.json"
LAUNCHER_LOG = "logs/azureml/launcher_azureml.log"
#: The run property where the launcher records how many lines each log file has (readers wait for them).
LOG_COUNTS_PROPERTY = "_runwatch.log_lines"
#: The run property where `submit` records how many processes the run starts.
PROCESSES_PROPERTY = "_runwatch.processes"
#: What `submit` records of a submitted run besides (the script, where it came from, its layout, its snapshot).
SCRIPT_PROPERTY = "_runwatch.script"
ARGUMENTS_PROPERTY = "_runwatch.arguments"
SOURCE_DIRECTORY_PROPERTY = "_runwatch.source_directory"
NODES_PROPERTY = "_runwatch.nodes"
PROCESSES_PER_NODE_PROPERTY = "_runwatch.processes_per_node"
SNAPSHOT_FILES_PROPERTY = "_runwatch.snapshot_files"
SNAPSHOT_BYTES_PROPERTY = "_runwatch.snapshot_bytes"
#: Who started the run (the OS user of the process that created it): get_details()'s "submittedBy".
USER_PROPERTY = "_runwatch.user"
#: A table's columns in the order they were first logged (log_row, log_table), as a JSON list: reads give
#: the columns in this order, as Azure does, not in the store's (alphabetical) one.
COLUMNS_PROPERTY_PREFIX = "_runwatch.columns."


def columns_property(table: str) -> str:
    return COLUMNS_PROPERTY_PREFIX + table


def order_tables(metrics: dict, properties: dict[str, str] | None) -> dict:
    """A run's metrics (get_metrics' shape) with each table's columns in their logged order, as the run's
    column properties record it (columns the property does not name keep their place after the others)."""
    import json

    for key, value in (properties or {}).items():
        if not key.startswith(COLUMNS_PROPERTY_PREFIX):
            continue
        table = metrics.get(key[len(COLUMNS_PROPERTY_PREFIX):])
        if not isinstance(table, dict):
            continue
        try:
            order = [c for c in json.loads(value) if c in table]
        except (ValueError, TypeError):
            continue
        rest = [c for c in table if c not in order]
        metrics[key[len(COLUMNS_PROPERTY_PREFIX):]] = {c: table[c] for c in order + rest}
    return metrics


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


def safe_name(name: Any) -> str:
    """`name` itself, if it is a relative POSIX path that stays inside its run as it is; else FileError naming
    what is wrong. A name is never changed: one the store would have to rewrite is refused."""
    if not isinstance(name, str) or not name:
        raise FileError(f"file name must be a non-empty string, not {name!r}")
    if "\x00" in name:
        raise FileError(f"file name {name!r} contains a NUL character")
    if len(name) > MAX_NAME:
        raise FileError(f"file name is {len(name)} characters long; at most {MAX_NAME}")
    bad = next((c for c in name if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise FileError(f"file name {name!r} contains the control character {bad!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise FileError(f"file name {name!r} is not valid Unicode (a lone surrogate)") from None
    if "\\" in name:
        raise FileError(f"file name {name!r} contains a backslash; separate directories with '/'")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise FileError(f"file name {name!r} is absolute; give a name relative to the run, e.g. outputs/model.pt")
    parts = name.split("/")
    if ".." in parts:
        raise FileError(f"file name {name!r} contains '..'; names cannot leave the run's directory")
    if any(p in ("", ".") for p in parts):
        clean = "/".join(p for p in parts if p not in ("", "."))
        raise FileError(f"file name {name!r} " + (f"would be stored as {clean!r}; give that name" if clean
                                                  else "names no file"))
    if parts[0] in RESERVED:
        raise FileError(f"file name {name!r} uses a reserved directory")
    return name


def run_dir_name(run_id: str) -> str:
    """The directory of a run's files: its id, or a digest of it when the id could not name a directory."""
    if not isinstance(run_id, str) or not run_id:
        raise FileError(f"run id must be a non-empty string, not {run_id!r}")
    if _RUN_ID.match(run_id) and ".." not in run_id:
        return run_id
    return "id-" + hashlib.sha256(run_id.encode()).hexdigest()[:32]

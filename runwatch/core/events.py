"""The event envelope every stage shares, its payloads, and their wire encoding (docs/wire-format.md)."""

from __future__ import annotations

import enum
import os
import socket
import time
import uuid
from typing import Annotated, Any, Literal, Union

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .states import RunStatus

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})


class MetricKind(str, enum.Enum):
    scalar = "scalar"   # run.log
    list = "list"       # run.log_list
    row = "row"         # run.log_row
    table = "table"     # run.log_table
    image = "image"     # run.log_image (a file name as the value)


class DType(str, enum.Enum):
    """How a stored value is given back: numbers are float64 on the wire, strings apart."""

    float = "float"
    int = "int"
    bool = "bool"
    str = "str"


class EventError(ValueError):
    """An event that no stage can take; the message says why (it goes to the dlq)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Model):
    host: str
    pid: int
    #: Random per process start: (host, pid) repeat, instances do not.
    instance: str
    node: int = 0
    rank: int = 0

    @property
    def key(self) -> str:
        return f"{self.host}:{self.pid}:{self.instance}"


# --- payloads: lifecycle (topic `runs`) ----------------------------------------------
class RunCreated(_Model):
    kind: Literal["run_created"] = "run_created"
    display_name: str | None = None
    parent_run_id: str | None = None
    run_type: str = "interactive"
    compute_target: str = "local"
    status: RunStatus = RunStatus.Running
    properties: dict[str, str] = {}
    tags: dict[str, str | None] = {}
    created_ts: float


class StatusChanged(_Model):
    kind: Literal["status"] = "status"
    status: RunStatus
    error: dict[str, Any] | None = None


class TagsSet(_Model):
    kind: Literal["tags"] = "tags"
    tags: dict[str, str | None]
    #: tags removed (run.remove_tags)
    removed: list[str] = []


class RunUpdated(_Model):
    """A run's display name or description changed (both are settable, as in Azure ML)."""

    kind: Literal["run_updated"] = "run_updated"
    display_name: str | None = None
    description: str | None = None


class PropertiesSet(_Model):
    kind: Literal["properties"] = "properties"
    properties: dict[str, str]


class Heartbeat(_Model):
    kind: Literal["heartbeat"] = "heartbeat"
    #: Points dropped by this process so far (buffer full or spool full); reported on the run.
    dropped: int = 0


class FileStored(_Model):
    """A file of the run is in the file store (its bytes never travel in events)."""

    kind: Literal["file"] = "file"
    name: str = Field(min_length=1, max_length=1024)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    content_type: str = "application/octet-stream"
    #: upload (upload_file/upload_folder), outputs (collected from ./outputs), image (log_image)
    origin: Literal["upload", "outputs", "image"] = "upload"


class LivenessCheck(_Model):
    """Written by a processor's timer to the run's own partition: heartbeats stopped; apply `to_status`
    only if the run is still in `if_status` and nothing was heard from it since `last_seen`."""

    kind: Literal["liveness"] = "liveness"
    if_status: RunStatus
    to_status: RunStatus
    last_seen: float
    silent_s: float


# --- payloads: data (topics `metrics`, `logs`) -------------------------------------------
class MetricName(_Model):
    name: str
    kind: MetricKind
    column: str = ""
    dtype: DType


def _arr(buf: bytes, dtype: str) -> np.ndarray:
    return np.frombuffer(buf, dtype=dtype)


class MetricBatch(_Model):
    """Points of one run in columnar form: a name table and little-endian arrays.

    Numeric points: `idx` (uint32, into `names`), `step` (int64), `ts` (int64 µs since
    the epoch), `value` (float64). String points: the same three index arrays with an
    `s_` prefix and `s_text`, a list of strings.
    """

    kind: Literal["metrics"] = "metrics"
    names: list[MetricName]
    idx: bytes = b""
    step: bytes = b""
    ts: bytes = b""
    value: bytes = b""
    s_idx: bytes = b""
    s_step: bytes = b""
    s_ts: bytes = b""
    s_text: list[str] = []

    @model_validator(mode="after")
    def _check_shapes(self) -> "MetricBatch":
        n = len(self.idx) // 4
        if len(self.idx) % 4 or len(self.step) != 8 * n or len(self.ts) != 8 * n or len(self.value) != 8 * n:
            raise ValueError("numeric arrays idx/step/ts/value differ in length")
        m = len(self.s_idx) // 4
        if len(self.s_idx) % 4 or len(self.s_step) != 8 * m or len(self.s_ts) != 8 * m or len(self.s_text) != m:
            raise ValueError("string arrays s_idx/s_step/s_ts/s_text differ in length")
        limit = len(self.names)
        if n and int(_arr(self.idx, "<u4").max()) >= limit:
            raise ValueError("idx points outside the name table")
        if m and int(_arr(self.s_idx, "<u4").max()) >= limit:
            raise ValueError("s_idx points outside the name table")
        return self

    @property
    def n_numeric(self) -> int:
        return len(self.idx) // 4

    @property
    def n_text(self) -> int:
        return len(self.s_idx) // 4

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return _arr(self.idx, "<u4"), _arr(self.step, "<i8"), _arr(self.ts, "<i8"), _arr(self.value, "<f8")

    def text_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        return _arr(self.s_idx, "<u4"), _arr(self.s_step, "<i8"), _arr(self.s_ts, "<i8"), self.s_text

    def parts(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str] | None]]:
        """The batch's points as column groups (name index, step, ts µs, value, texts): the numbers (texts
        None), then the strings (value NaN). Every stage that reads a batch's points reads them here."""
        out = []
        if self.n_numeric:
            out.append((*self.arrays(), None))
        if self.n_text:
            idx, step, ts, texts = self.text_arrays()
            out.append((idx, step, ts, np.full(len(texts), np.nan), texts))
        return out

    @classmethod
    def from_arrays(cls, names: list[MetricName], idx, step, ts, value, s_idx=None, s_step=None, s_ts=None,
                    s_text=None) -> "MetricBatch":
        empty = np.empty(0)
        return cls.model_construct(
            kind="metrics",
            names=names,
            idx=np.ascontiguousarray(idx, "<u4").tobytes(),
            step=np.ascontiguousarray(step, "<i8").tobytes(),
            ts=np.ascontiguousarray(ts, "<i8").tobytes(),
            value=np.ascontiguousarray(value, "<f8").tobytes(),
            s_idx=np.ascontiguousarray(empty if s_idx is None else s_idx, "<u4").tobytes(),
            s_step=np.ascontiguousarray(empty if s_step is None else s_step, "<i8").tobytes(),
            s_ts=np.ascontiguousarray(empty if s_ts is None else s_ts, "<i8").tobytes(),
            s_text=list(s_text or []),
        )


class LogBatch(_Model):
    """Consecutive lines of one log file of a run (seq numbers first_seq, first_seq+1, ...)."""

    kind: Literal["logs"] = "logs"
    file: str
    node: int = 0
    rank: int = 0
    stream: Literal["stdout", "stderr", "system"] = "stdout"
    first_seq: int = Field(ge=0)
    ts: bytes  # int64 µs per line
    lines: list[str]

    @model_validator(mode="after")
    def _check_shapes(self) -> "LogBatch":
        if len(self.ts) != 8 * len(self.lines):
            raise ValueError("ts and lines differ in length")
        return self


# --- payloads written by the processors (topics `aggregates`, `alerts`, `dlq`) -----------
class MetricAggregates(_Model):
    """Running aggregates per (run, metric), after the batch with `event_id` = source_event."""

    kind: Literal["aggregates"] = "aggregates"
    source_event: str
    rows: list[dict[str, Any]]


class RunState(_Model):
    """The processors' view of one run: a full snapshot, newest `version` wins."""

    kind: Literal["run_state"] = "run_state"
    version: int
    snapshot: dict[str, Any]


class Transition(_Model):
    kind: Literal["transition"] = "transition"
    from_status: RunStatus | None
    to_status: RunStatus
    applied: bool
    reason: str = ""
    source_event: str


class Alert(_Model):
    kind: Literal["alert"] = "alert"
    status: RunStatus
    reason: str
    details: dict[str, Any] = {}


class DeadLetter(_Model):
    kind: Literal["dead_letter"] = "dead_letter"
    reason: str
    topic: str
    partition: int
    offset: int
    #: The first 4 KiB of the message as it was received.
    raw: bytes


Payload = Annotated[
    Union[RunCreated, StatusChanged, TagsSet, RunUpdated, PropertiesSet, Heartbeat, LivenessCheck, FileStored,
          MetricBatch,
          LogBatch,
          MetricAggregates, RunState, Transition, Alert, DeadLetter],
    Field(discriminator="kind"),
]


class Envelope(_Model):
    schema_version: int = SCHEMA_VERSION
    event_id: str
    kind: str
    run_id: str = Field(min_length=1, max_length=256)
    experiment: str = ""
    ts: float
    source: Source
    seq: int = Field(ge=0)
    payload: Payload

    @model_validator(mode="after")
    def _kind_matches(self) -> "Envelope":
        if self.kind != self.payload.kind:
            raise ValueError(f"envelope kind {self.kind!r} differs from payload kind {self.payload.kind!r}")
        if self.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
            raise ValueError(f"unsupported schema_version {self.schema_version}")
        return self


# --- encoding --------------------------------------------------------------------------
def encode(env: Envelope) -> bytes:
    """msgpack of the envelope; numeric arrays travel as raw little-endian bytes."""
    return msgpack.packb(_to_wire(env), use_bin_type=True)


def _to_wire(env: Envelope) -> dict[str, Any]:
    p = env.payload
    payload = {k: getattr(p, k) for k in type(p).model_fields}
    for k, v in payload.items():
        if isinstance(v, enum.Enum):
            payload[k] = v.value
    if isinstance(p, MetricBatch):
        payload["names"] = [[n.name, n.kind.value, n.column, n.dtype.value] for n in p.names]
    src = env.source
    return {
        "v": env.schema_version, "id": env.event_id, "k": env.kind, "r": env.run_id, "x": env.experiment,
        "t": env.ts, "s": [src.host, src.pid, src.instance, src.node, src.rank], "q": env.seq, "p": payload,
    }


def decode(data: bytes) -> Envelope:
    """Parse and validate one message; raise EventError saying what is wrong, and nothing else: every
    stage that decodes can then dead-letter a bad message instead of stopping on it."""
    try:
        return _decode(data)
    except EventError:
        raise
    except Exception as exc:  # a shape the checks below did not foresee: still the message's fault
        raise EventError(f"undecodable: {type(exc).__name__}: {exc}") from None


def _decode(data: bytes) -> Envelope:
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise EventError(f"not a msgpack message: {exc}") from None
    if not isinstance(raw, dict):
        raise EventError("message is not a map")
    version = raw.get("v")
    if type(version) is not int or version not in SUPPORTED_SCHEMA_VERSIONS:  # a list is unhashable; True == 1
        raise EventError(f"unsupported schema_version {version!r} (this build reads {sorted(SUPPORTED_SCHEMA_VERSIONS)})")
    try:
        src = raw["s"]
        payload = raw["p"]
        if isinstance(payload, dict) and payload.get("kind") == "metrics" and isinstance(payload.get("names"), list):
            payload = dict(payload)
            payload["names"] = [
                {"name": n[0], "kind": n[1], "column": n[2], "dtype": n[3]} if isinstance(n, list) and len(n) == 4 else n
                for n in payload["names"]
            ]
        return Envelope.model_validate({
            "schema_version": version, "event_id": raw["id"], "kind": raw["k"], "run_id": raw["r"],
            "experiment": raw.get("x", ""), "ts": raw["t"],
            "source": {"host": src[0], "pid": src[1], "instance": src[2], "node": src[3], "rank": src[4]},
            "seq": raw["q"], "payload": payload,
        })
    except (KeyError, IndexError, TypeError) as exc:
        raise EventError(f"envelope field missing or malformed: {exc!r}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise EventError(f"invalid event: {where}: {first['msg']} ({exc.error_count()} error(s))") from None


# --- helpers used by producers and processors --------------------------------------------
def new_event_id() -> str:
    return uuid.uuid4().hex


_SOURCE: tuple[int, Source] | None = None


def this_source() -> Source:
    """The Source of this process, made anew after a fork."""
    global _SOURCE
    pid = os.getpid()
    if _SOURCE is None or _SOURCE[0] != pid:
        _SOURCE = (pid, Source(
            host=socket.gethostname(), pid=pid, instance=uuid.uuid4().hex[:12],
            node=_env_int("NODE_RANK"), rank=_env_int("RANK"),
        ))
    return _SOURCE[1]


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def make_envelope(run_id: str, experiment: str, payload: Any, seq: int, source: Source | None = None,
                  event_id: str | None = None) -> Envelope:
    return Envelope.model_construct(
        schema_version=SCHEMA_VERSION, event_id=event_id or new_event_id(), kind=payload.kind, run_id=run_id,
        experiment=experiment, ts=time.time(), source=source or this_source(), seq=seq, payload=payload,
    )

"""Every runwatch setting, resolved in one order: argument, RUNWATCH_* variable, config file, default."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger("runwatch.settings")

ENV_PREFIX = "RUNWATCH_"
CONFIG_FILE = "config.toml"
STACK_FILE = "stack.json"


def default_home() -> Path:
    return Path(os.environ.get("RUNWATCH_HOME") or Path.home() / ".runwatch").expanduser()


@dataclass(frozen=True)
class Settings:
    """Resolved settings. Build with `Settings.load(...)`, never by hand."""

    home: Path = field(default_factory=default_home)
    #: Kafka bootstrap servers; None means "the embedded stack recorded in HOME/stack.json".
    bootstrap_servers: str | None = None
    #: Read API address; None means "the embedded stack recorded in HOME/stack.json".
    api_url: str | None = None
    api_token: str | None = None
    #: Grafana's address, when the studio runs there: get_portal_url() then opens the Run dashboard.
    grafana_url: str | None = None
    topic_prefix: str = "runwatch."
    partitions: int = 1
    #: Replicas of each topic runwatch creates (3 on an Apache Kafka cluster, 1 on the embedded broker).
    replication_factor: int = 1
    min_insync_replicas: int = 1
    # --- training side -------------------------------------------------------------
    #: Seconds between background flushes (the issue asks for 200 ms or less). Each flush costs the
    #: training process's background thread ~1 ms of CPU whatever it carries (measured on a busy core,
    #: docs/performance.md): 0.2 s instead of 0.1 halves what a slowly logging run pays.
    flush_interval: float = 0.2
    #: The interpreter's thread switch interval (seconds) while a process logs faster than its background thread
    #: sends: that thread then gets the GIL back soon after each wait for the network (the default 5 ms let a
    #: logging loop keep it while events piled up in memory). Restored when the buffer is small again; 0: never.
    boost_switch_interval: float = 0.0005
    #: Points in the hot buffer that wake the background thread early.
    batch_max_points: int = 50_000
    #: Hot points (about 128 bytes each as Python tuples) past which the logging thread turns them into numpy
    #: columns itself (28 bytes a number): the background thread is behind (producers/buffer.py).
    buffer_max_points: int = 200_000
    #: Bytes the buffer may hold in all, hot points and columns: past them points are dropped (counted). The
    #: background thread keeps it far below, moving what it cannot send yet to the outbox and the spool.
    buffer_max_bytes: int = 96 << 20
    #: Encoded events waiting for the broker, in memory; past this every event goes to the spool on disk
    #: (in order) until the spool is sent.
    outbox_max_bytes: int = 64 << 20
    #: On the embedded broker (which keeps everything in memory), bytes of sent events kept on disk until the
    #: read API says they are stored, to send again after the broker restarts; 0: none kept.
    retain_max_bytes: int = 1 << 30
    #: Seconds between a producer's questions to the read API about what of it is stored (embedded broker).
    confirm_interval: float = 1.0
    #: Seconds a process that ends waits for the store to confirm its last events (embedded broker); what is
    #: not confirmed stays on disk as a spool, which the worker sends again.
    close_confirm_timeout: float = 2.0
    #: Bytes the on-disk spool may hold before events are dropped (counted, reported).
    spool_max_bytes: int = 1 << 30
    heartbeat_interval: float = 5.0
    #: System metrics (CPU, memory, disk, network, GPU) logged into every run under `system/`, from a daemon
    #: thread of the training process (producers/system.py, docs/system-metrics.md); false: none.
    system_metrics: bool = True
    #: Seconds between two system samples.
    system_metrics_interval: float = 10.0
    #: What `start_logging()` does with the process's output when not told (producers/capture.py): "auto" tees
    #: it into the run's logs in a script and not in a notebook; "true" always; "false" never.
    capture_output: str = "auto"
    max_metric_names: int = 1000
    max_name_length: int = 255
    #: Tags and properties (docs/limits.md): a name's and a value's length in characters, how many a run has
    #: of each, and all of a run's names and values together in characters (its state travels as one message).
    max_tag_name_length: int = 256
    max_tag_value_length: int = 32_768
    max_tags: int = 10_000
    max_tags_bytes: int = 262_144
    #: Kafka compression. zstd: aiokafka compresses lz4 at level 9, which cost 185 ns a point (the largest
    #: item in a trainer's profile); zstd at its level 3 costs 25 ns and makes batches 4x smaller
    #: (1.4 vs 5.3 bytes a point, docs/performance.md).
    compression: str = "zstd"
    #: "auto": on, except on the embedded Tansu broker, which rejects InitProducerId.
    idempotence: str = "auto"
    #: "tansu" or "kafka"; "auto" reads it from the embedded stack's record (kafka when none).
    broker_kind: str = "auto"
    #: 0: the emitter already batches by time (`flush_interval`) and hands the producer whole batches, so
    #: lingering adds no batching, only latency: 20 ms cost every run.complete() ~34 ms (docs/performance.md).
    linger_ms: int = 0
    max_request_size: int = 8 << 20
    #: How long a consumer's fetch may wait for data (ms). The embedded broker holds every fetch this long even
    #: when data comes sooner (Apache Kafka answers at once), so it is what each hop of the pipeline costs there.
    fetch_max_wait_ms: int = 50
    request_timeout_ms: int = 10_000
    # --- security (docs/reliability.md, Security) ----------------------------------------
    #: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL: for the producers, the processors and the sink.
    kafka_security_protocol: str = "PLAINTEXT"
    #: SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN (with a SASL_* protocol).
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    #: PEM files: the CA that signed the brokers' certificates; a client certificate and key for mutual TLS.
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    clickhouse_username: str | None = None
    clickhouse_password: str | None = None
    #: PEM CA for an https:// ClickHouse URL.
    clickhouse_ca_cert: str | None = None
    # --- worker ----------------------------------------------------------------------
    clickhouse_url: str | None = None
    #: "all" (processors, sink and read API), or "processors" (only the Faust app: add these to scale out;
    #: one "all" worker keeps the sink and the API).
    worker_role: str = "all"
    #: "assign": one sink reads every partition (the embedded default: no group join); "group": the sinks of
    #: one consumer group share the partitions (several `sink` workers); "auto": group for worker_role "sink".
    sink_mode: str = "auto"
    api_host: str = "127.0.0.1"
    api_port: int = 8765
    #: Host names the read API answers to, besides localhost, 127.0.0.1, ::1, api_host and this machine's name
    #: (comma-separated; "*": any). A request with another Host is refused (a web page using DNS rebinding).
    api_allowed_hosts: str = ""
    #: Seconds the read API waits, at most, for a writer's own last points before it answers that writer's read.
    read_wait: float = 10.0
    #: 1: when api_port is taken, the worker takes any free port and records it (the embedded stack); 0: it fails.
    api_port_fallback: int = 0
    #: The identity of an embedded stack (set by `runwatch up`): its broker's cluster id, returned by its read
    #: API on every answer, so that no client takes another stack for its own.
    stack_id: str | None = None
    #: Seconds between the worker's looks for spools that ended processes left behind (it sends them; 0: never).
    orphan_spool_interval: float = 5.0
    broker_port: int = 19092
    #: The largest message the processors write (a run's state with its tags and properties, a batch's
    #: aggregates); an event that would lead to a larger one is refused, to the dlq with the reason.
    processor_max_message_bytes: int = 4 << 20
    sink_max_wait: float = 0.1
    sink_max_batch_events: int = 2000
    #: Event bytes (decompressed) per sink insert: a fetch is written in chunks of this size, each with its
    #: own offset commit (16 MiB: about 600 k points).
    sink_max_batch_bytes: int = 16 << 20
    #: On the embedded chDB: the sink writes nothing while the disk holding it has less free than this (MiB),
    #: and says so in /api/health; the broker keeps the events until there is room. chDB reported a
    #: streaming insert as written while a nearly full disk lost it (docs/reliability.md).
    sink_min_free_mb: int = 256
    #: The read API shows a watched run's newest points from the stream before the sink has stored them
    #: (runwatch/api/live.py): a run read in the last `live_watch_seconds` is watched, at most `live_max_runs` at
    #: once; the tail holds at most `live_max_points` points not stored yet, about 30 bytes each (a run
    #: that would pass it shows its stored points alone until the sink has caught up).
    #: live_max_runs = 0 turns the tail off.
    live_watch_seconds: float = 30.0
    live_max_runs: int = 100
    live_max_points: int = 1_000_000
    #: Seconds after a run finished when the sink checks its running aggregates against its stored points
    #: (and recomputes them from the points if the processors skipped a batch after a crash).
    aggregates_check_delay: float = 10.0
    #: Seconds without a heartbeat before a Running run becomes NotResponding.
    heartbeat_timeout: float = 30.0
    #: Seconds a run may stay NotResponding before it is declared Failed.
    not_responding_timeout: float = 60.0
    #: Where alerts (Failed, NotResponding) are POSTed as JSON; none when unset.
    alert_webhook_url: str | None = None
    alert_webhook_attempts: int = 5
    #: Where run files (snapshots, uploads, outputs) are kept; default HOME/files.
    files_dir: Path | None = None
    #: Largest single file the store takes (uploads, outputs/).
    max_file_bytes: int = 1 << 30
    # --- submitted runs ----------------------------------------------------------------
    #: Compute targets of the local launcher and their process slots: "name=slots,name=slots".
    compute_targets: str = "local=4"
    #: Largest snapshot of a source directory (Azure ML's limit was 300 MB).
    snapshot_max_bytes: int = 300 << 20
    #: Longer output lines are cut into pieces of this many characters.
    max_log_line: int = 16_384
    #: Seconds a rank gets to exit after SIGTERM (cancel, or another rank failed) before SIGKILL.
    kill_grace: float = 10.0

    # ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, **overrides: Any) -> "Settings":
        """Resolve every field: argument, then environment, then config file, then default."""
        args = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(args) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown runwatch setting(s): {', '.join(sorted(unknown))}")
        home = Path(args["home"]).expanduser() if "home" in args else default_home()
        file_values = _read_config_file(home)
        values: dict[str, Any] = {"home": home}
        for f in fields(cls):
            if f.name == "home":
                continue
            if f.name in args:
                values[f.name] = _coerce(f, args[f.name], origin="argument", strict=True)
                continue
            env = os.environ.get(ENV_PREFIX + f.name.upper())
            if env is not None and env != "":
                parsed = _coerce(f, env, origin=f"${ENV_PREFIX}{f.name.upper()}", strict=False)
                if parsed is not _INVALID:
                    values[f.name] = parsed
                    continue
            if f.name in file_values:
                parsed = _coerce(f, file_values[f.name], origin=str(home / CONFIG_FILE), strict=False)
                if parsed is not _INVALID:
                    values[f.name] = parsed
        return cls(**values)

    def captures_output(self, notebook: bool) -> bool:
        """Whether `start_logging()` captures the output when not told (`capture_output`: auto, true, false)."""
        mode = str(self.capture_output).strip().lower()
        if mode not in ("auto", "true", "false"):
            raise ValueError(f"RUNWATCH_CAPTURE_OUTPUT is {mode!r}: it is one of auto, true, false")
        return not notebook if mode == "auto" else mode == "true"

    def kafka_args(self) -> dict[str, Any]:
        """Security arguments for every aiokafka client (producer, consumer, admin)."""
        proto = self.kafka_security_protocol.upper()
        if proto not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            raise ValueError(f"setting kafka_security_protocol: {self.kafka_security_protocol!r} is not one of "
                             "PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL")
        args: dict[str, Any] = {"security_protocol": proto}
        if proto.startswith("SASL"):
            if not (self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password):
                raise ValueError(f"setting kafka_security_protocol {proto} needs kafka_sasl_mechanism, "
                                 "kafka_sasl_username and kafka_sasl_password")
            args.update(sasl_mechanism=self.kafka_sasl_mechanism.upper(),
                        sasl_plain_username=self.kafka_sasl_username, sasl_plain_password=self.kafka_sasl_password)
        if proto.endswith("SSL"):
            args["ssl_context"] = self.ssl_context()
        return args

    def ssl_context(self):
        import ssl

        ctx = ssl.create_default_context(cafile=self.kafka_ssl_cafile)
        if self.kafka_ssl_certfile:
            ctx.load_cert_chain(self.kafka_ssl_certfile, self.kafka_ssl_keyfile)
        return ctx

    def portal_url(self, run_id: str) -> str:
        """Where a person looks at a run: Grafana's Run dashboard, else the read API's run page."""
        from urllib.parse import quote

        if self.grafana_url:
            return f"{self.grafana_url.rstrip('/')}/d/runwatch-run/runwatch-run?var-run_id={quote(run_id)}"
        base = self.resolved_api_url() or f"http://{self.api_host}:{self.api_port}"
        return f"{base.rstrip('/')}/runs/{quote(run_id)}"

    def experiment_url(self, experiment: str) -> str:
        """Where a person looks at an experiment's runs: Grafana's Runs dashboard, else the read API's page."""
        from urllib.parse import quote

        if self.grafana_url:
            return f"{self.grafana_url.rstrip('/')}/d/runwatch-runs/runwatch-runs?var-experiment={quote(experiment)}"
        base = self.resolved_api_url() or f"http://{self.api_host}:{self.api_port}"
        return f"{base.rstrip('/')}/experiments/{quote(experiment, safe='')}"

    def compute(self) -> dict[str, int]:
        """The compute targets and their slots, from `compute_targets`; a malformed entry is a clear error."""
        out: dict[str, int] = {}
        for item in filter(None, (x.strip() for x in self.compute_targets.split(","))):
            name, eq, slots = item.partition("=")
            try:
                n = int(slots) if eq else 0
            except ValueError:
                n = 0
            if not name.strip() or n < 1:
                raise ValueError(f"setting compute_targets: {item!r} must be NAME=SLOTS with SLOTS >= 1 "
                                 f"(whole setting: {self.compute_targets!r})")
            out[name.strip()] = n
        return out

    def files_root(self) -> Path:
        return self.files_dir or self.home / "files"

    def as_env(self) -> dict[str, str]:
        """RUNWATCH_* variables that make a child process resolve exactly these settings."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[ENV_PREFIX + f.name.upper()] = str(value)
        return out

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    # --- the embedded stack's record --------------------------------------------------
    @property
    def stack_file(self) -> Path:
        return self.home / STACK_FILE

    def stack_record(self) -> dict[str, Any]:
        try:
            return json.loads(self.stack_file.read_text())
        except (OSError, ValueError):
            return {}

    def resolved_bootstrap(self) -> str | None:
        return self.bootstrap_servers or self.stack_record().get("bootstrap_servers")

    def resolved_api_url(self) -> str | None:
        return self.api_url or self.stack_record().get("api_url")

    def use_idempotence(self) -> bool:
        if self.idempotence in ("true", "on", "1"):
            return True
        if self.idempotence in ("false", "off", "0"):
            return False
        # auto: the embedded broker answers InitProducerId with an error (docs/architecture.md, Dependencies)
        return self.resolved_broker_kind() != "tansu"

    def resolved_broker_kind(self) -> str:
        if self.broker_kind != "auto":
            return self.broker_kind
        if self.bootstrap_servers:
            return "kafka"
        return self.stack_record().get("broker_kind", "kafka")


_INVALID = object()


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _coerce(f: dataclasses.Field, raw: Any, *, origin: str, strict: bool) -> Any:
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if raw is None:
            return None
        if "Path" in typ:
            return Path(raw).expanduser()
        if typ.startswith("bool"):
            if isinstance(raw, bool):
                return raw
            word = str(raw).strip().lower()
            if word in _TRUE or word in _FALSE:
                return word in _TRUE
            raise ValueError(f"say one of {', '.join(sorted(_TRUE | _FALSE))}")
        if typ.startswith("int"):
            if isinstance(raw, bool):
                raise ValueError("a bool is not an int")
            return int(raw)
        if typ.startswith("float"):
            value = float(raw)
            if value != value or value < 0:
                raise ValueError("must be a non-negative number")
            return value
        return str(raw)
    except (TypeError, ValueError) as exc:
        if strict:
            raise ValueError(f"setting {f.name!r} from {origin}: {raw!r} is not valid ({exc})") from None
        log.warning("runwatch: ignoring %s=%r (%s); using the default", origin, raw, exc)
        return _INVALID


def _read_config_file(home: Path) -> dict[str, Any]:
    path = home / CONFIG_FILE
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        log.warning("runwatch: cannot read %s (%s); using defaults", path, exc)
        return {}
    section = data.get("runwatch", data)
    return section if isinstance(section, dict) else {}

"""The ClickHouse schema, created and migrated by the sink; each migration runs once, in order."""

from __future__ import annotations

import logging

log = logging.getLogger("runwatch.sink")

DEDUP = "SETTINGS non_replicated_deduplication_window = 10000"

#: The numbers of metric_points' Enum8 columns (migration 1); the sink inserts these numbers.
KIND_CODES = {"scalar": 1, "list": 2, "row": 3, "table": 4, "image": 5}
DTYPE_CODES = {"float": 1, "int": 2, "bool": 3, "str": 4}

#: (version, description, statements). Append only: never edit a migration that has shipped.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "initial schema", [
        f"""CREATE TABLE IF NOT EXISTS metric_points (
            run_id String CODEC(ZSTD(1)),
            experiment LowCardinality(String),
            name LowCardinality(String),
            kind Enum8('scalar' = 1, 'list' = 2, 'row' = 3, 'table' = 4, 'image' = 5),
            column LowCardinality(String),
            dtype Enum8('float' = 1, 'int' = 2, 'bool' = 3, 'str' = 4),
            step Int64 CODEC(Delta, ZSTD(1)),
            ts DateTime64(6, 'UTC') CODEC(Delta, ZSTD(1)),
            value Float64 CODEC(ZSTD(1)),
            text String CODEC(ZSTD(1)),
            src LowCardinality(String),
            seq UInt64 CODEC(Delta, ZSTD(1))
        ) ENGINE = MergeTree ORDER BY (run_id, name, column, step, ts) {DEDUP}""",
        f"""CREATE TABLE IF NOT EXISTS metric_aggregates (
            run_id String, experiment LowCardinality(String), name String, column String,
            kind LowCardinality(String), count UInt64, min Float64, max Float64, first Float64, last Float64,
            last_text String, last_step Int64, last_ts DateTime64(6, 'UTC'), version UInt64
        ) ENGINE = ReplacingMergeTree(version) ORDER BY (run_id, name, column) {DEDUP}""",
        f"""CREATE TABLE IF NOT EXISTS runs (
            run_id String, experiment LowCardinality(String), display_name Nullable(String),
            parent_run_id Nullable(String), run_type LowCardinality(String), compute_target LowCardinality(String),
            status LowCardinality(String), created_time Nullable(DateTime64(6, 'UTC')),
            start_time Nullable(DateTime64(6, 'UTC')), end_time Nullable(DateTime64(6, 'UTC')),
            properties Map(String, String), tags Map(String, String), tags_json String, error String,
            last_heartbeat Nullable(DateTime64(6, 'UTC')), dropped_points UInt64, illegal_transitions UInt64,
            version UInt64
        ) ENGINE = ReplacingMergeTree(version) ORDER BY run_id {DEDUP}""",
        f"""CREATE TABLE IF NOT EXISTS status_history (
            run_id String, experiment LowCardinality(String), ts DateTime64(6, 'UTC'),
            from_status LowCardinality(String), to_status LowCardinality(String), applied UInt8, reason String,
            event_id String
        ) ENGINE = ReplacingMergeTree ORDER BY (run_id, event_id) {DEDUP}""",
        f"""CREATE TABLE IF NOT EXISTS log_lines (
            run_id String, experiment LowCardinality(String), file LowCardinality(String), node UInt16,
            rank UInt32, stream LowCardinality(String), seq UInt64, ts DateTime64(6, 'UTC'), line String,
            src LowCardinality(String), eseq UInt64
        ) ENGINE = MergeTree ORDER BY (run_id, file, seq) {DEDUP}""",
        f"""CREATE TABLE IF NOT EXISTS alerts (
            run_id String, experiment LowCardinality(String), ts DateTime64(6, 'UTC'), status LowCardinality(String),
            reason String, details String, alert_id String
        ) ENGINE = ReplacingMergeTree ORDER BY (run_id, alert_id) {DEDUP}""",
        f"""CREATE TABLE IF NOT EXISTS dead_letters (
            ts DateTime64(6, 'UTC'), topic String, partition Int32, offset Int64, reason String, raw String
        ) ENGINE = MergeTree ORDER BY ts {DEDUP}""",
        """CREATE TABLE IF NOT EXISTS sink_intents (
            group_id String, topic String, partition Int32, start_offset Int64, end_offset Int64,
            ts DateTime64(6, 'UTC') DEFAULT now64(6)
        ) ENGINE = MergeTree ORDER BY (group_id, topic, partition, start_offset)
        TTL toDateTime(ts) + INTERVAL 7 DAY""",
    ]),
    (2, "run files (names and checksums; the bytes live in the file store)", [
        f"""CREATE TABLE IF NOT EXISTS run_files (
            run_id String, experiment LowCardinality(String), name String, size UInt64, sha256 String,
            content_type LowCardinality(String), origin LowCardinality(String), ts DateTime64(6, 'UTC')
        ) ENGINE = ReplacingMergeTree(ts) ORDER BY (run_id, name) {DEDUP}""",
    ]),
    # ZSTD(1) made the sink's inserts and ClickHouse's merges of metric_points dearer: the worker's CPU a
    # point 0.83 µs with it, 0.725 with LZ4 (means of 4 alternated runs of the 4-process ingest; LZ4 lower
    # in each pair), for 1.15 instead of 2.15 bytes a point of that load. CPU bounds the ingest, disk does
    # not (docs/performance.md). Parts written before keep their codec until merged.
    (3, "metric_points compressed with LZ4: less CPU a point for the ingest", [
        """ALTER TABLE metric_points
            MODIFY COLUMN run_id String CODEC(LZ4),
            MODIFY COLUMN step Int64 CODEC(Delta, LZ4),
            MODIFY COLUMN ts DateTime64(6, 'UTC') CODEC(Delta, LZ4),
            MODIFY COLUMN value Float64 CODEC(LZ4),
            MODIFY COLUMN text String CODEC(LZ4),
            MODIFY COLUMN seq UInt64 CODEC(Delta, LZ4)""",
    ]),
    # The processors' run state survives a restart of the embedded broker (whose changelog topics vanish):
    # they reload it from `runs`, with what they had taken of each source (core/seqs.py), kept here.
    (4, "runs keep the sequence numbers their state was built from", [
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS seen String DEFAULT ''",
    ]),
    (5, "dead letters name their run (the message key), so that a run's can be listed", [
        "ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS run_id String DEFAULT ''",
    ]),
    (6, "runs have a description (settable, as in Azure ML)", [
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS description Nullable(String)",
    ]),
]

LATEST = MIGRATIONS[-1][0]


def migrate(client, database: str = "runwatch") -> int:
    """Create the database and apply pending migrations; return the schema version."""
    client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    client.command(f"""CREATE TABLE IF NOT EXISTS {database}.schema_migrations (
        version UInt32, description String, applied DateTime64(3, 'UTC') DEFAULT now64(3)
    ) ENGINE = MergeTree ORDER BY version""")
    done = {r[0] for r in client.query(f"SELECT version FROM {database}.schema_migrations").result_rows}
    for version, description, statements in MIGRATIONS:
        if version in done:
            continue
        for stmt in statements:
            for verb in ("CREATE TABLE IF NOT EXISTS ", "ALTER TABLE "):
                if stmt.startswith(verb):
                    stmt = stmt.replace(verb, f"{verb}{database}.", 1)
            client.command(stmt)
        client.insert(f"{database}.schema_migrations", [[version, description]],
                      column_names=["version", "description"])
        log.info("runwatch: applied schema migration %d (%s)", version, description)
    return max(done | {v for v, _, _ in MIGRATIONS})

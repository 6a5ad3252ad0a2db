"""Kafka, once: runwatch's topics and how every client of them is built (producers, consumers, admin).

aiokafka is imported inside each function: `import runwatch` stays light, and a training process pays
for it only when its background thread first connects.
"""

from __future__ import annotations

import os
from typing import Any

from .settings import Settings

#: Every topic runwatch uses, before the configurable prefix (docs/wire-format.md).
TOPICS = ("runs", "metrics", "logs", "aggregates", "alerts", "dlq")
#: Bytes in one producer batch.
BATCH_BYTES = 1 << 20


def producer(settings: Settings, bootstrap: str, client_id: str | None = None, **overrides: Any):
    """The producer every stage writes with: acks=all, idempotent where the broker supports it, zstd."""
    from aiokafka import AIOKafkaProducer

    args: dict[str, Any] = dict(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=settings.use_idempotence(),
        compression_type=settings.compression or None, linger_ms=settings.linger_ms, max_batch_size=BATCH_BYTES,
        max_request_size=settings.max_request_size, request_timeout_ms=settings.request_timeout_ms,
        client_id=client_id or f"runwatch-{os.getpid()}", **settings.kafka_args())
    args.update(overrides)
    return AIOKafkaProducer(**args)


def consumer(settings: Settings, bootstrap: str, client_id: str, group_id: str | None = None, **overrides: Any):
    """A consumer that commits nothing by itself; large fetches (a batch of points is up to ~3 MB)."""
    from aiokafka import AIOKafkaConsumer

    args: dict[str, Any] = dict(
        bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False, auto_offset_reset="earliest",
        max_partition_fetch_bytes=16 << 20, fetch_max_bytes=64 << 20, client_id=client_id,
        fetch_max_wait_ms=settings.fetch_max_wait_ms, **settings.kafka_args())
    args.update(overrides)
    return AIOKafkaConsumer(**args)


def admin(settings: Settings, bootstrap: str, client_id: str = "runwatch-admin"):
    from aiokafka.admin import AIOKafkaAdminClient

    return AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id=client_id,
                               request_timeout_ms=settings.request_timeout_ms, **settings.kafka_args())


async def ensure_topics(settings: Settings, bootstrap: str) -> str:
    """Create runwatch's topics with the configured partitions (brokers auto-create with their own); return
    the cluster's id, which names this broker's lifetime (a restarted embedded broker has a new one)."""
    from aiokafka.admin import NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    client = admin(settings, bootstrap)
    await client.start()
    try:
        cluster = await client.describe_cluster()
        existing = set(await client.list_topics())
        configs = ({"min.insync.replicas": str(settings.min_insync_replicas)}
                   if settings.replication_factor > 1 else {})
        missing = [NewTopic(settings.topic(t), settings.partitions, settings.replication_factor, topic_configs=configs)
                   for t in TOPICS if settings.topic(t) not in existing]
        if missing:
            try:
                await client.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
        return str(cluster.get("cluster_id") or "")
    finally:
        await client.close()


async def cluster_id(settings: Settings, bootstrap: str) -> str:
    client = admin(settings, bootstrap)
    await client.start()
    try:
        return str((await client.describe_cluster()).get("cluster_id") or "")
    finally:
        await client.close()


async def partitions(settings: Settings, bootstrap: str, topics: list[str]) -> dict[str, set[int]]:
    """{topic: its partitions} from the cluster's metadata (empty for a topic it does not know yet)."""
    client = admin(settings, bootstrap)
    await client.start()
    try:
        described = await client.describe_topics(topics)
    finally:
        await client.close()
    by_name = {d["topic"]: {p["partition"] for p in d.get("partitions") or []}
               for d in described if not d.get("error_code")}
    return {t: by_name.get(t, set()) for t in topics}

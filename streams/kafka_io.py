"""Kafka connection settings and the topic set: what every Kafka-using process shares.

The commit discipline every stage follows: poll, produce the output,
:meth:`streams.kafka_producer.BatchProducer.flush` (raises if any send failed), make local state
durable, and only then :meth:`streams.kafka_consumer.GroupConsumer.commit` the offsets *of what
was processed*. A kill -9 anywhere in between replays input instead of losing it. Works the same
against Apache Kafka and the embedded Tansu (kafka-python underneath).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError


@dataclass(frozen=True)
class Topics:
    """The topic names of one Headwater deployment (all share a prefix)."""

    impressions: str
    actions: str
    examples: str
    params: str
    dlq: str
    late: str
    items: str  # item-side features, one message per item id (compacted): streams.item_features
    # The joiners' own hand-off records (compacted), created by the joiner: streams.join_handoff.
    # Internal to the joiner group, so not in all() (the set a deployment creates up front).
    join_positions: str = ""

    def all(self) -> list[str]:
        return [getattr(self, short) for short in _SHORT_NAMES]


_SHORT_NAMES = ("impressions", "actions", "examples", "params", "dlq", "late", "items")

# Topic configs set at creation (others get the broker's defaults). hw.items is compacted and
# never expires by time or size: it is the catalog of every item's current features, and a
# serving replica rebuilds its catalog by reading it from the beginning.
TOPIC_CONFIGS: dict[str, dict[str, str]] = {
    "items": {"cleanup.policy": "compact", "retention.ms": "-1", "retention.bytes": "-1"},
}


def topic_names(prefix: str = "hw") -> Topics:
    """``<prefix>.impressions`` etc.; a fresh prefix gives a fresh, isolated set of topics."""
    return Topics(*(f"{prefix}.{t}" for t in _SHORT_NAMES),
                  join_positions=f"{prefix}.join_positions")


@dataclass
class KafkaConfig:
    """Connection and client tuning shared by every Kafka-using process."""

    bootstrap_servers: str = field(default="127.0.0.1:9092",
                                   metadata={"help": "Kafka bootstrap servers, host:port[,host:port]"})
    topic_prefix: str = field(default="hw", metadata={"help": "topic name prefix (<prefix>.examples ...)"})
    compression: str = field(default="lz4", metadata={"help": "producer compression: lz4, gzip or none"})
    linger_ms: int = field(default=5, metadata={"help": "producer batching delay"})
    batch_bytes: int = field(default=1 << 20, metadata={"help": "producer batch size per partition"})
    max_message_bytes: int = field(default=8 << 20, metadata={"help": "largest message produced/fetched"})
    retries: int = field(default=2_147_483_647, metadata={
        "help": "producer retries on transient errors (bounded in time by delivery_timeout_ms)"})
    delivery_timeout_ms: int = field(default=120_000, metadata={
        "help": "a send not acknowledged within this (retries included) fails loudly"})
    buffer_memory: int = field(default=64 << 20, metadata={
        "help": "unacknowledged bytes a producer holds (e.g. while the broker is away)"})
    max_block_ms: int = field(default=60_000, metadata={
        "help": "send() blocks this long on a full buffer, then fails loudly"})
    idempotence: bool = field(default=False, metadata={
        "help": "idempotent producer. Off by default: against Tansu 0.6.0 on s3:// storage an "
                "idempotent retry that straddles a broker crash can be answered as a duplicate "
                "while the batch itself was lost (acknowledged, then missing); without it a "
                "retry may duplicate a batch instead, and every consumer de-duplicates by id"})
    max_poll_interval_ms: int = field(
        default=3000, metadata={"help": "consumer-group rebalance timeout (Tansu needs a few seconds)"})
    session_timeout_ms: int = field(default=10000, metadata={"help": "consumer-group session timeout"})


def admin_client(cfg: KafkaConfig, timeout_s: float = 10.0) -> KafkaAdminClient:
    return KafkaAdminClient(bootstrap_servers=cfg.bootstrap_servers, client_id="hw-admin",
                            request_timeout_ms=int(timeout_s * 1000))


def create_topics(cfg: KafkaConfig, partitions: dict[str, int] | int = 1,
                  prefix: str | None = None) -> Topics:
    """Creates the topic set of ``prefix`` (existing topics are left as they are).

    ``partitions`` is one count for all, or per short name (``{"impressions": 4}``, rest 1).
    Topics with an entry in :data:`TOPIC_CONFIGS` (``items``: compacted) are created with it.
    """
    topics = topic_names(prefix if prefix is not None else cfg.topic_prefix)
    counts = partitions if isinstance(partitions, dict) else {}
    default = partitions if isinstance(partitions, int) else 1
    admin = admin_client(cfg)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, counts.get(short, default), 1, topic_configs=TOPIC_CONFIGS.get(short, {}))
               for short, name in zip(_SHORT_NAMES, topics.all()) if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
    return topics

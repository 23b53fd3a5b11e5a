"""Configuration of the online joiner (``headwater join``; :mod:`streams.joiner`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from streams.kafka_io import KafkaConfig


@dataclass
class JoinerConfig:
    """Configuration of ``headwater join``."""

    bootstrap_servers: str = field(default="127.0.0.1:9092", metadata={"help": "Kafka bootstrap servers"})
    topic_prefix: str = field(default="hw", metadata={"help": "topic name prefix"})
    group_id: str = field(default="hw-joiner", metadata={"help": "consumer group of the joiner"})
    state_dir: str = field(default="state/joiner", metadata={"help": "RocksDB directory of pending state"})
    window_s: float = field(default=600.0, metadata={"help": "event-time join window after an impression"})
    emit: str = field(default="window", metadata={
        "help": "window: examples at window close, labels final; early: negatives after "
                "--early-hold-s and a positive copy per later click (delayed-feedback stream)"})
    early_hold_s: float = field(
        default=1.0, metadata={"help": "with --emit early: event time an impression is held"})
    allowed_lateness_s: float = field(
        default=5.0, metadata={"help": "watermark lag behind the newest impression time"})
    negative_rate: float = field(
        default=1.0, metadata={"help": "keep probability of negatives (recorded as sample_rate)"})
    positive_kinds: str = field(default="click", metadata={"help": "comma-separated action kinds that label 1"})
    dense_dim: int = field(default=0, metadata={"help": "width of impression dense features (0 = none)"})
    examples_per_message: int = field(default=4096, metadata={"help": "examples per hw.examples message"})
    poll_max_records: int = field(default=2000, metadata={"help": "input messages per step at most"})
    max_close_per_step: int = field(default=20000, metadata={"help": "requests closed per step at most"})
    idle_close_s: float = field(
        default=0.0, metadata={"help": "close every window after this long without input (0 = never)"})
    idle_topic_s: float = field(
        default=2.0, metadata={"help": "an input topic quiet this long stops holding the watermark"})
    compression: str = field(default="lz4", metadata={"help": "producer compression"})
    max_poll_interval_ms: int = field(default=3000, metadata={"help": "consumer-group rebalance timeout"})

    def validate(self) -> None:
        if not 0.0 < self.negative_rate <= 1.0:
            raise ValueError("negative_rate must be in (0, 1]")
        if self.window_s <= 0 or self.allowed_lateness_s < 0:
            raise ValueError("window_s must be > 0 and allowed_lateness_s >= 0")
        if self.emit not in ("window", "early"):
            raise ValueError(f"emit must be window or early, got {self.emit!r}")
        if not 0 <= self.early_hold_s < self.window_s:
            raise ValueError("early_hold_s must be in [0, window_s)")

    def kafka(self) -> KafkaConfig:
        return KafkaConfig(bootstrap_servers=self.bootstrap_servers, topic_prefix=self.topic_prefix,
                           compression=self.compression, max_poll_interval_ms=self.max_poll_interval_ms)

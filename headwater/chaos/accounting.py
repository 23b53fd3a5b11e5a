"""Where did every input event go? The ledger behind ``headwater bench chaos``.

The generator is deterministic under its seed, so the input is *re-derived*, not trusted from a
log: the first ``requests`` requests (all acknowledged: the generator flushed before it
reported them) are regenerated and each input event is looked up on the topics:

- an impression item is accounted for when its example (deterministic id, ``streams.ids``) is
  on ``hw.examples``, or the joiner's negative sampling dropped it (the draw is deterministic:
  :func:`streams.ids.keep_negative` recomputes it; only a would-be negative can be dropped), or
  its impression message went to ``hw.dlq``;
- a click is accounted for when its example is on ``hw.examples`` with label 1, or it was routed
  to ``hw.late`` (too late to join);
- every example on ``hw.examples`` must be in the trainer's de-dup state of its last checkpoint
  (the filter records each id it trained), i.e. trained at least once.

Duplicates on ``hw.examples`` (``duplicate_examples``) are expected after a joiner kill -9: it
re-emits the windows it had not committed, with the same ids. That figure counts what was
*emitted* twice, not what was *trained* twice. What the trainer trained is read from its last
checkpoint, the lineage of the state it serves (a crash rolls the state back to a checkpoint, and
what it had trained after that is trained again from there, once): ``examples_trained`` counts
every example that reached a gradient step, de-dup or not, and ``duplicates_trained`` is that
count minus the distinct example ids it trained. It is exact while the filter has forgotten
nothing (``dedup_forgotten == 0``: the run stayed inside the filter's window); beyond that, a
copy whose original was forgotten goes uncounted, and ``examples_untrained`` over-counts.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgpack
import numpy as np

from streams.events import SchemaError, decode_dead_letter, decode_event, decode_examples
from streams.generator import GeneratorConfig, SyntheticStream
from streams.ids import keep_negative, request_hash, row_example_ids
from streams.kafka_consumer import log_end, read_topic
from streams.kafka_io import KafkaConfig, topic_names
from training.dedup import SeenFilter

log = logging.getLogger(__name__)

__all__ = ["Ledger", "TrainedLineage", "account", "end_offset", "expected_stream",
           "trained_ids", "trained_lineage"]


@dataclass
class Ledger:
    """The accounting of one run (all counts are input events unless named otherwise)."""

    events_in: int = 0
    events_accounted: int = 0
    lost: int = 0
    impression_items: int = 0
    items_as_examples: int = 0
    items_sampled_out: int = 0
    items_in_dlq: int = 0
    clicks: int = 0
    clicks_joined: int = 0
    clicks_late: int = 0
    requests_acknowledged: int = 0
    requests_missing_from_topic: int = 0  # acknowledged by the broker, then not on the topic
    example_messages: int = 0
    examples_on_topic: int = 0
    duplicate_examples: int = 0  # re-emitted after a joiner crash (same id): emitted twice
    examples_untrained: int = 0  # on hw.examples but absent from the trainer's de-dup state
    examples_trained: int = 0  # gradient-step examples in the trainer's final state (its manifest)
    duplicates_skipped: int = 0  # copies the trainer's filter dropped, in that state's lineage
    duplicates_trained: int = 0  # examples_trained minus the distinct ids trained: learned twice
    dedup_forgotten: int = 0  # ids the filter forgot (window rolled over); > 0: figures inexact

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Expected:
    """The regenerated input: per request its id, and per shown item its example id and click."""

    request_ids: list[str]
    example_id: np.ndarray  # int64[R * k]
    clicked: np.ndarray  # bool[R * k]
    pair_request: np.ndarray  # int64[R * k]: row of the request
    items: np.ndarray  # int64[R * k]


def expected_stream(cfg: GeneratorConfig, requests: int, block_requests: int = 512) -> Expected:
    """The first ``requests`` requests of the generator's stream, as produced in blocks."""
    world = SyntheticStream(cfg)
    rids, items, clicked = [], [], []
    for block in world.blocks(requests, block_requests):
        rids.extend(f"g{cfg.seed}-{i}" for i in block.request_index.tolist())
        items.append(block.items)
        clicked.append(block.clicked)
    item_arr = np.concatenate(items) if items else np.zeros((0, cfg.items_per_request), np.int64)
    k = item_arr.shape[1]
    req_hash = np.fromiter((request_hash(r) for r in rids), np.uint64, len(rids))
    flat = item_arr.reshape(-1)
    ex = row_example_ids(flat, np.repeat(req_hash, k))
    click_arr = np.concatenate(clicked).reshape(-1) if clicked else np.zeros(0, bool)
    return Expected(rids, ex, click_arr, np.repeat(np.arange(len(rids)), k), flat)


@dataclass
class TrainedLineage:
    """What the state in a trainer checkpoint has learned (see the module docstring)."""

    examples_trained: int = 0  # examples that reached a gradient step (after de-dup)
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # distinct, sorted
    duplicates_skipped: int = 0
    forgotten: int = 0

    @property
    def duplicates_trained(self) -> int:
        """Examples trained beyond one per distinct id (forgotten ids counted as trained once)."""
        return self.examples_trained - self.forgotten - len(self.ids)


def trained_lineage(checkpoint_dir: str | Path) -> TrainedLineage:
    """The newest checkpoint's trained-example count, remembered ids and de-dup counters."""
    from training.checkpoint import CheckpointStore

    store = CheckpointStore(checkpoint_dir)
    manifest = store.latest()
    if manifest is None:
        return TrainedLineage()
    tensors, _ = store.load_state(manifest)
    state = {k: t.numpy() for k, t in tensors.items() if k.startswith("dedup.")}
    dropped, forgotten = SeenFilter.stats_in_state(state)
    return TrainedLineage(int(manifest.examples_trained), SeenFilter.ids_in_state(state),
                          dropped, forgotten)


def trained_ids(checkpoint_dir: str | Path) -> np.ndarray:
    """Every example id in the de-dup state of the trainer's newest checkpoint (sorted)."""
    return trained_lineage(checkpoint_dir).ids


def _in(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[pos] == ids


def log_ends(kafka: KafkaConfig, topic: str) -> dict[int, int]:
    """The next offset a producer would get, per partition of ``topic`` (the true end on Tansu
    too: :func:`streams.kafka_consumer.log_end`)."""
    from kafka import KafkaConsumer

    c = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False)
    try:
        return {p: int(o) for p, o in log_end(c, topic).items()}
    finally:
        c.close()


def end_offset(kafka: KafkaConfig, topic: str, partition: int = 0) -> int:
    """The next offset a producer would get on ``topic[partition]``."""
    return log_ends(kafka, topic).get(partition, 0)


def _read(kafka: KafkaConfig, topic: str) -> list[bytes]:
    """All of a topic, every partition: reading stops once it has every record up to the ends
    read first, not after idling (a loaded box can pause a poll for longer than any idle rule)."""
    end = sum(log_ends(kafka, topic).values())
    if end == 0:
        return []
    return [r.value for r in read_topic(kafka, topic, stop_after=end, idle_s=30.0, timeout_s=300.0)]


def account(kafka: KafkaConfig, gen: GeneratorConfig, requests: int, negative_rate: float,
            checkpoint_dir: str | Path | None) -> Ledger:
    """Reads the topics (and the trainer's checkpoint) and accounts for every input event."""
    topics = topic_names(kafka.topic_prefix)
    exp = expected_stream(gen, requests)
    led = Ledger(requests_acknowledged=requests, impression_items=len(exp.example_id),
                 clicks=int(exp.clicked.sum()))
    led.events_in = led.impression_items + led.clicks

    on_topic = set()
    for value in _read(kafka, topics.impressions):
        obj = msgpack.unpackb(value, raw=False)
        if isinstance(obj, dict) and obj.get("t") == "imp":
            on_topic.add(obj.get("request_id"))
    led.requests_missing_from_topic = sum(1 for r in exp.request_ids if r not in on_topic)

    dlq_requests = set()
    for value in _read(kafka, topics.dlq):
        try:
            event = decode_event(decode_dead_letter(value).payload)
        except SchemaError:
            continue  # a dead letter whose payload is not an impression (or undecodable)
        if hasattr(event, "request_id"):
            dlq_requests.add(event.request_id)
    late_pairs = set()
    for value in _read(kafka, topics.late):
        for a in decode_event(decode_dead_letter(value).payload):
            late_pairs.add((a.request_id, a.item_id))

    ids, labels = [], []
    messages = _read(kafka, topics.examples)
    led.example_messages = len(messages)
    for value in messages:
        batch = decode_examples(value)
        ids.append(batch.example_id)
        labels.append(batch.label)
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    uniq, first = np.unique(all_ids, return_index=True)
    led.examples_on_topic = len(all_ids)
    led.duplicate_examples = len(all_ids) - len(uniq)
    positive_ids = np.unique(all_ids[all_labels > 0])

    # Impression items.
    as_example = _in(uniq, exp.example_id)
    late = np.fromiter(((exp.request_ids[r], int(i)) in late_pairs
                        for r, i in zip(exp.pair_request[exp.clicked].tolist(),
                                        exp.items[exp.clicked].tolist())), bool, int(exp.clicked.sum()))
    joined_click = np.zeros(len(exp.example_id), bool)
    joined_click[np.flatnonzero(exp.clicked)[~late]] = True
    # Only an impression that reached the topic can have been sampled out by the joiner.
    req_on_topic = np.fromiter((r in on_topic for r in exp.request_ids), bool, len(exp.request_ids))
    sampled_out = (~as_example & ~joined_click & req_on_topic[exp.pair_request]
                   & ~keep_negative(exp.example_id, negative_rate))
    in_dlq = ~as_example & ~sampled_out & np.fromiter(
        (exp.request_ids[r] in dlq_requests for r in exp.pair_request.tolist()), bool,
        len(exp.pair_request)) if dlq_requests else np.zeros(len(exp.example_id), bool)
    led.items_as_examples = int(as_example.sum())
    led.items_sampled_out = int(sampled_out.sum())
    led.items_in_dlq = int(in_dlq.sum())

    # Clicks: labelled 1 on their example, or on hw.late.
    click_ids = exp.example_id[exp.clicked]
    led.clicks_joined = int((_in(positive_ids, click_ids) & ~late).sum())
    led.clicks_late = int(late.sum())

    led.events_accounted = (led.items_as_examples + led.items_sampled_out + led.items_in_dlq
                            + led.clicks_joined + led.clicks_late)
    led.lost = led.events_in - led.events_accounted
    if checkpoint_dir is not None:
        lineage = trained_lineage(checkpoint_dir)
        led.examples_untrained = int((~_in(lineage.ids, uniq)).sum())
        led.examples_trained = lineage.examples_trained
        led.duplicates_skipped = lineage.duplicates_skipped
        led.duplicates_trained = lineage.duplicates_trained
        led.dedup_forgotten = lineage.forgotten
        if lineage.forgotten:
            log.warning("the trainer's de-dup filter forgot %d ids: duplicates_trained and "
                        "examples_untrained are not exact", lineage.forgotten)
    log.info("ledger: %s", led.as_dict())
    return led

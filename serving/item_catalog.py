"""The serving side of ``hw.items``: every item's item-side features, so ``Recommend`` needs only ids.

A model trained on item-side slots (``genres``) and item-side numeric columns saw them in every
example; a ``Recommend`` call names only candidate ids. :class:`ItemCatalog` follows the
compacted ``hw.items`` topic (:mod:`streams.item_features`) from the beginning on a background
thread (a :class:`streams.topic_follower.TopicFollower`), like the parameter server follows
``hw.params``, and keeps the newest features of each item (by event time) in a bounded
:class:`~serving.item_store.ItemStore`; scoring (:func:`serving.scoring.score_jobs`) reads a
whole batch's candidates from it in one vectorised call. Size ``max_items`` above the item
count: an evicted item reads as unknown until it is published again.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from prometheus_client import Gauge

from serving.item_store import CATALOG_REFUSED, ItemRows, ItemStore, missing_tail
from streams.item_features import ItemFeatures, decode_item_message
from streams.topic_follower import TopicFollower
from streams.wire import SchemaError

log = logging.getLogger(__name__)

__all__ = ["ItemCatalogConfig", "ItemCatalog", "ItemStore", "ItemRows", "missing_tail"]

CATALOG_ITEMS = Gauge("hw_serve_item_catalog_items", "items held in the serving item catalog",
                      multiprocess_mode="livemax")


@dataclass
class ItemCatalogConfig:
    """How the catalog follows ``hw.items`` and how much it holds."""

    max_items: int = field(default=1_000_000, metadata={
        "help": "items kept; beyond, least recently used ones are evicted"})
    max_ids_per_bag: int = field(default=1000, metadata={
        "help": "ids of one item in one slot; a longer bag is refused"})
    poll_timeout_ms: int = field(default=100, metadata={"help": "Kafka poll timeout"})


class ItemCatalog:
    """Follows ``hw.items`` from the beginning on a background thread into an :class:`ItemStore`.

    Readers (the scoring threads) and the follower share one lock; a batch's read is one
    vectorised call under it. A missing topic is waited for (it appears when the first item is
    published); an undecodable message is counted and skipped.
    """

    def __init__(self, cfg: ItemCatalogConfig, bootstrap_servers: str, topic: str) -> None:
        self.cfg = cfg
        self.bootstrap_servers, self.topic = bootstrap_servers, topic
        self.store = ItemStore(cfg.max_items, cfg.max_ids_per_bag)
        self._lock = threading.Lock()
        self._follower = TopicFollower(bootstrap_servers, topic, self._handle,
                                       client_id="hw-item-catalog", poll_timeout_ms=cfg.poll_timeout_ms)
        self.applied = 0
        self.bad = 0

    # -- what scoring reads -----------------------------------------------------------------
    @property
    def slots(self) -> frozenset[str]:
        return self.store.slots

    @property
    def dense_width(self) -> int:
        return self.store.dense_width

    def __len__(self) -> int:
        return len(self.store)

    def rows(self, items: np.ndarray, slots: Sequence[str], dense: bool) -> ItemRows:
        with self._lock:
            return self.store.rows(items, slots, dense)

    def apply(self, updates: Iterable[ItemFeatures]) -> int:
        """Applies decoded messages (the follower's path; also for tests and offline use)."""
        with self._lock:
            n = self.store.apply(updates)
            CATALOG_ITEMS.set(len(self.store))
        self.applied += n
        return n

    @property
    def caught_up(self) -> bool:
        """True once everything on the topic when the follower started has been applied."""
        return self._follower.caught_up

    def wait_caught_up(self, timeout_s: float) -> bool:
        return self._follower.wait_caught_up(timeout_s)

    @property
    def error(self) -> BaseException | None:
        """What stopped the follower (None while it runs or before it starts)."""
        return self._follower.error

    # -- following the topic ----------------------------------------------------------------
    def start(self) -> "ItemCatalog":
        self._follower.start()
        return self

    def stop(self) -> None:
        self._follower.stop()

    def _handle(self, records: list[Any]) -> None:
        """One poll's messages, decoded (a bad one counted and skipped) and applied together."""
        updates: list[ItemFeatures] = []
        for m in records:
            try:
                updates.append(decode_item_message(m.key, m.value, m.timestamp))
            except SchemaError as exc:
                self.bad += 1
                CATALOG_REFUSED.labels("bad_message").inc()
                log.warning("skipping bad %s message at %d:%d: %s", self.topic, m.partition,
                            m.offset, exc)
        if updates:
            self.apply(updates)


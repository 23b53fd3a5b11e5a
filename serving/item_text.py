"""Item text for the LLM rerank stage: what the language model reads about each item.

Held by the serving process, bounded: at most ``max_items`` texts of at most ``max_chars``
characters each, the least recently used evicted first. Texts come from a catalog file (CSV,
CSV.GZ, Parquet or JSON lines; one row per item: an id column and text columns such as title,
description and attributes) and from ``hw.items`` messages that carry a ``text`` (upserts; a
tombstone forgets the item). Item ids follow the real-log rule (:func:`streams.log_schema.entity_ids`):
an integer cell is its own id and any other cell the stable hash of the column name and the
value, so a catalog keyed by ``movieId`` strings finds the ids the replay trained on.

The rendered text of a row is its non-empty text columns joined by ``" | "`` in the order given
(``Toy Story (1995) | Adventure|Animation``). A row without an id or without any text is
refused with its reason (``rejected``), never loaded half-way.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from serving import metrics as m

log = logging.getLogger(__name__)

__all__ = ["ItemTextConfig", "ItemTexts", "ItemTextFollower", "RejectedRow", "read_catalog"]

SEPARATOR = " | "


@dataclass
class ItemTextConfig:
    """Where item texts come from and how much of them the process keeps."""

    item_text: str = field(default="", metadata={"help": "item catalog file for the LLM rerank (CSV, Parquet or .jsonl; an id column and text columns)"})
    item_text_id_col: str = field(default="item_id", metadata={"help": "the catalog's item id column"})
    item_text_cols: str = field(default="title,description,attributes", metadata={"help": "comma-separated text columns, joined in this order (absent ones are skipped)"})
    max_text_items: int = field(default=1_000_000, metadata={"help": "item texts held in memory; beyond, the least recently used go"})
    max_text_chars: int = field(default=300, metadata={"help": "characters kept of each item's text"})
    item_text_topic: bool = field(default=True, metadata={"help": "also take item texts from hw.items (messages with a text set it, tombstones forget it)"})

    def columns(self) -> list[str]:
        return [c.strip() for c in self.item_text_cols.split(",") if c.strip()]


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """A catalog row that was not loaded, with where and why."""

    row: int
    reason: str


class ItemTexts:
    """item id -> text, bounded (LRU); thread-safe (the rerank stage reads, a loader writes)."""

    def __init__(self, max_items: int = 1_000_000, max_chars: int = 300) -> None:
        if max_items <= 0 or max_chars <= 0:
            raise ValueError("max_items and max_chars must be positive")
        self.max_items, self.max_chars = max_items, max_chars
        self._texts: OrderedDict[int, str] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._texts)

    def put(self, item_id: int, text: str | None) -> None:
        """Sets an item's text (None or empty: forgets it, a tombstone)."""
        with self._lock:
            if not text:
                self._texts.pop(item_id, None)
            else:
                self._texts[item_id] = text[: self.max_chars]
                self._texts.move_to_end(item_id)
                while len(self._texts) > self.max_items:
                    self._texts.popitem(last=False)
                    self.evicted += 1
                    m.ITEM_TEXT_EVICTIONS.inc()
            m.ITEM_TEXTS.set(len(self._texts))

    def update(self, pairs: Iterable[tuple[int, str | None]]) -> int:
        n = 0
        for item_id, text in pairs:
            self.put(item_id, text)
            n += 1
        return n

    def get(self, item_ids: Sequence[int]) -> list[str | None]:
        """Each item's text, None where unknown; a hit counts as a use for the LRU order."""
        with self._lock:
            out = []
            for i in item_ids:
                t = self._texts.get(i)
                if t is not None:
                    self._texts.move_to_end(i)
                out.append(t)
            return out

    def load(self, path: str | Path, cfg: ItemTextConfig | None = None) -> list[RejectedRow]:
        """Loads a catalog file; returns the refused rows (each also logged)."""
        cfg = cfg or ItemTextConfig()
        rejected: list[RejectedRow] = []
        loaded = 0
        for ids, texts, bad in read_catalog(path, cfg.item_text_id_col, cfg.columns()):
            loaded += self.update(zip(ids, texts))
            rejected.extend(bad)
        for r in rejected[:20]:
            log.warning("%s: row %d not loaded: %s", path, r.row, r.reason)
        if rejected:
            m.ITEM_TEXT_REJECTED.inc(len(rejected))
        log.info("item texts: %d loaded from %s, %d rows refused", loaded, path, len(rejected))
        return rejected


def _tables(path: Path) -> Iterator[tuple[pa.Table, list[int], list[RejectedRow]]]:
    """The catalog file as string columns, as a log is read (CSV, TSV, Parquet, JSON Lines:
    :func:`streams.log_source.read_chunks`): per chunk its rows' line numbers and the lines that
    are no row at all (a malformed JSON line, a CSV row with too many cells)."""
    from streams.log_source import read_chunks

    for chunk in read_chunks(path):
        yield chunk.table, chunk.line.tolist(), [RejectedRow(b.line, b.reason) for b in chunk.invalid]


def read_catalog(path: str | Path, id_col: str, text_cols: Sequence[str]
                 ) -> Iterator[tuple[list[int], list[str], list[RejectedRow]]]:
    """The catalog's ``(ids, texts, refused rows)`` a chunk at a time."""
    from streams.log_schema import entity_ids

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"item catalog {path} does not exist")
    for table, lines, unreadable in _tables(path):
        if id_col not in table.column_names:
            raise ValueError(f"{path}: no id column {id_col!r} (columns: {table.column_names})")
        present = [c for c in text_cols if c in table.column_names]
        if not present:
            raise ValueError(f"{path}: none of the text columns {list(text_cols)} (columns: {table.column_names})")
        raw_ids = table.column(id_col).cast(pa.string()).to_pylist()
        cols = [table.column(c).cast(pa.string()).to_pylist() for c in present]
        ids, texts, bad, keep = [], [], list(unreadable), []
        for k, raw in enumerate(raw_ids):
            text = SEPARATOR.join(v.strip() for v in (col[k] for col in cols) if v and v.strip())
            if raw is None or not raw.strip():
                bad.append(RejectedRow(lines[k], f"empty {id_col}"))
            elif not text:
                bad.append(RejectedRow(lines[k], f"no text in {present}"))
            else:
                keep.append(raw.strip())
                texts.append(text)
        if keep:
            ids = entity_ids(id_col, keep).tolist()
        yield ids, texts, bad


class ItemTextFollower:
    """Keeps :class:`ItemTexts` current from ``hw.items``, read from the beginning (compacted).

    A message with a ``text`` sets the item's text; a tombstone forgets it; a message without one
    (features only) leaves the text as it is, so file-loaded texts survive feature updates. An
    undecodable message is counted in ``bad`` and skipped.
    """

    def __init__(self, texts: ItemTexts, bootstrap_servers: str, topic: str) -> None:
        from streams.topic_follower import TopicFollower

        self.texts = texts
        self.bad = 0
        self.follower = TopicFollower(bootstrap_servers, topic, self._apply, client_id="hw-item-text")

    def _apply(self, records: list) -> None:
        from streams.item_features import decode_item_message
        from streams.wire import SchemaError

        pairs: list[tuple[int, str | None]] = []
        for r in records:
            try:
                f = decode_item_message(r.key, r.value, r.timestamp)
            except SchemaError:
                self.bad += 1
                continue
            if f.tombstone or f.text is not None:
                pairs.append((f.item_id, None if f.tombstone else f.text))
        if pairs:
            self.texts.update(pairs)

    def wait_caught_up(self, timeout_s: float) -> bool:
        return self.follower.wait_caught_up(timeout_s)

    @property
    def error(self) -> BaseException | None:
        return self.follower.error

    def start(self) -> "ItemTextFollower":
        self.follower.start()
        return self

    def stop(self) -> None:
        self.follower.stop()

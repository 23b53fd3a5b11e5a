"""Feature columns of a log that a model must not learn from, found in a sample of its rows.

Inference (:mod:`streams.log_infer`) gives every column a kind from its cells alone; these kinds
of column are only seen beside the item and the label (or by their names), and each is made an ``ignore`` column
with a note saying why (a column the schema file describes is kept as it says):

- **a figure over the item's interactions** (an item attribute named ``average_rating``,
  ``review_count``, ``stars``, ``popularity``): taken over the whole log, later rows too;
- **one more id of the item** (an item-side categorical with a value per item: an image URL, a
  second code): it says nothing the item id does not, and is crossed with the user by default;
- **a row's own id** (a user-side categorical whose values almost never repeat, counted once
  per request: a review's id or text, a per-row UUID, a time written as a string, a page's id):
  nothing learned from one row carries to another, and each value would take a row of the
  embedding table;
- **an outcome** (a log with labels): a column named for an engagement (KuaiRand's
  ``is_follow``, Tenrec's ``share`` beside its ``click``), or a user-side cell value on a good
  share of the rows that comes only with positives, or only with negatives (Goodreads' ``is_read = 0`` beside every
  unrated book; a price of 0 on every line with a quantity of 0). Written when the label was, it
  is unknown when serving, and the model learns the label from it instead of the user's taste;
- **the item's own details in a log of positives only**: a user-side cell that says which item
  the row is about (a track of the artist that is the item; the price the article sold at). A
  sampled negative copies its positive's cells beside another item, so the pair alone tells
  positives from negatives: a test AUC near 1 that serving never sees.

Rules are on the first :data:`SAMPLE_ROWS` good rows and need :data:`MIN_CELLS` of them (and as
many non-empty cells for a row id or an item detail), so a small log keeps every column.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streams.log_cells import parse_floats
from streams.log_names import POSITIVE_WORDS
from streams.log_schema import ColumnSpec, feature_ids

__all__ = ["LeakSample"]

SAMPLE_ROWS = 1 << 17
# An engagement's name (less "is_"/"has_"): a column so named beside the label is an outcome.
OUTCOME_WORDS = POSITIVE_WORDS | frozenset((
    "follow", "followed", "comment", "commented", "forward", "forwarded", "hate", "hated", "dislike",
    "disliked", "skip", "skipped", "longview", "finish", "finished", "complete", "completed", "profileenter",
    "reply", "replied", "retweet", "retweeted", "vote", "voted", "bookmark", "bookmarked", "reorder",
    "reordered"))
MIN_CELLS = 200  # no verdict on fewer non-empty cells
ROW_ID_SHARE = 0.8  # distinct values per non-empty cell of a row's own id
PURE_SHARE = 0.02  # an outcome: a value on this share of the rows (and PURE_ROWS of them)...
PRESENCE_SHARE = 0.005  # ...or the cell's being empty, or not, on this share...
PURE_ROWS = 50
PURE_RATE = 0.005  # ...whose label rate is within this of 0 or 1...
OTHER_RATE = 0.2  # ...while the other label is at least this common over the sample
ITEM_TWIN_SHARE = 0.9  # an item-side categorical with this many values per item is another item id
MIN_ITEMS = 50  # ...judged on at least this many items
FOLLOWS_ITEM = 0.9  # an item detail: this share of a value's rows are about one item...
FOLLOWS_ITEM_VARIANCE = 0.8  # ...or the item explains this share of a number's variance


class LeakSample:
    """The first :data:`SAMPLE_ROWS` good rows' items, labels and feature cells, fed chunk by
    chunk during inference's pass; :meth:`findings` judges the columns."""

    def __init__(self, columns: list[str], rows: int = SAMPLE_ROWS) -> None:
        self.columns, self.room = columns, rows
        self.items: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.requests: list[np.ndarray] = []  # (user, time) per row: the rows of one request
        self.cells: dict[str, list[pa.Array]] = {c: [] for c in columns}

    def add(self, table: pa.Table, item_id: np.ndarray, label: np.ndarray, ok: np.ndarray,
            user_id: np.ndarray, ts_ms: np.ndarray) -> None:
        if self.room <= 0 or not self.columns:
            return
        keep = np.flatnonzero(ok)[: self.room]
        self.room -= len(keep)
        self.items.append(item_id[keep])
        self.labels.append(label[keep])
        self.requests.append(np.stack([user_id[keep], ts_ms[keep]], 1))
        take = pa.array(keep, pa.int64())
        for c in self.columns:
            self.cells[c].append(pc.fill_null(table.column(c), "").take(take).combine_chunks())

    def findings(self, specs: list[ColumnSpec], implicit: bool) -> dict[str, str]:
        """Column name -> why it is left out, for the columns of ``specs`` that break a rule."""
        if not self.items:
            return {}
        items, labels = np.concatenate(self.items), np.concatenate(self.labels).astype(np.float64)
        requests = np.unique(np.concatenate(self.requests), axis=0, return_inverse=True)[1].reshape(-1)
        out: dict[str, str] = {}
        for spec in specs:
            if spec.kind in ("ignore", "text") or spec.name not in self.cells:
                continue
            cells = pa.concat_arrays(self.cells[spec.name]).cast(pa.string())
            empty = pc.equal(cells, "").to_numpy(zero_copy_only=False)
            if len(cells) < MIN_CELLS:
                continue
            ids = feature_ids(spec.name, cells)
            if spec.side != "user":  # the same on every row of its item: an item attribute...
                why = _aggregate_by_name(spec.name)
                if why is None and spec.kind == "categorical":
                    why = _item_id_twin(ids, empty, items)
                if why is not None:  # ...unless it is one more name of the item
                    out[spec.name] = why
                continue
            why = _row_id(ids, empty, requests) if spec.kind == "categorical" else None
            if why is None and not implicit:
                why = _outcome_by_name(spec.name) or _outcome(ids, empty, labels)
            if why is None and implicit:
                why = (_follows_item_numeric(cells, empty, items) if spec.kind == "numeric"
                       else _follows_item(ids, empty, items))
            if why is not None:
                out[spec.name] = why
        return out


def _item_id_twin(ids: np.ndarray, empty: np.ndarray, items: np.ndarray) -> str | None:
    n_items = len(np.unique(items[~empty]))
    values = len(np.unique(ids[~empty]))
    if n_items < MIN_ITEMS or values < ITEM_TWIN_SHARE * n_items:
        return None
    return (f"one value per item ({values} values for {n_items} items): one more id of the item (a URL, "
            "a second code), which tells nothing the item id does not, and crossed with the user only "
            "repeats user x item")


def _row_id(ids: np.ndarray, empty: np.ndarray, requests: np.ndarray) -> str | None:
    """Counted per request: a page's id, repeated on each of its items' rows, is a row id too."""
    cells = len(np.unique(np.stack([requests[~empty], ids[~empty]], 1), axis=0))
    distinct = len(np.unique(ids[~empty]))
    if cells < MIN_CELLS or distinct < ROW_ID_SHARE * cells:
        return None
    return (f"its values almost never repeat ({distinct} distinct in {cells} cells): a row's own id "
            "or text, from which nothing carries to another row")


# Words of an item's figure over the interactions themselves: average_rating, rating_number,
# review_count, stars (Yelp's business table), vote_average, popularity.
AGGREGATE_WORDS = frozenset(("rating", "ratings", "review", "reviews", "stars", "vote", "votes", "popularity",
                             "likes", "plays", "purchases", "sales", "favorites", "favourites"))


def _aggregate_by_name(name: str) -> str | None:
    """An item attribute named for a figure over the interactions (Amazon's ``average_rating``,
    ``rating_number``; Yelp's ``stars``, ``review_count``): computed over the whole log, later
    rows too, it tells the model how the item fared before it did."""
    words = re.sub(r"([a-z])([A-Z])", r"\1 \2", name.rsplit(".", 1)[-1]).lower()
    if not AGGREGATE_WORDS & set(re.split(r"[^a-z]+", words)):
        return None
    return (f"its name says it sums up the item's interactions ({name!r}): taken over the whole log, "
            "later rows too, it is an outcome, unknown when serving")


def _outcome_by_name(name: str) -> str | None:
    """A column named for an engagement beside the label (KuaiRand's ``is_like``,
    ``is_follow``; Tenrec's ``share`` beside ``click``): another outcome of the same event."""
    norm = re.sub(r"[^a-z0-9]", "", name.lower())
    word = re.sub(r"^(is|has|did)", "", norm)
    if word not in OUTCOME_WORDS and norm not in OUTCOME_WORDS:
        return None
    return (f"its name is an engagement's ({name!r}): another outcome of the event, as the label is, "
            "unknown when serving")


def _outcome(ids: np.ndarray, empty: np.ndarray, labels: np.ndarray) -> str | None:
    n, rate = len(labels), float(labels.mean())
    presence = max(PURE_ROWS, PRESENCE_SHARE * n)
    states = [(name, rows, presence) for name, rows in (("empty", empty), ("non-empty", ~empty))]
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    big = max(PURE_ROWS, PURE_SHARE * n)
    states += [(None, inverse == v, big) for v in np.flatnonzero(counts >= big)]
    for name, rows, least in states:
        count = int(rows.sum())
        if count < least:
            continue
        r = float(labels[rows].mean())
        if (r >= 1 - PURE_RATE and rate <= 1 - OTHER_RATE) or (r <= PURE_RATE and rate >= OTHER_RATE):
            which = "positive" if r >= 0.5 else "negative"
            what = f"{'an' if name == 'empty' else 'a'} {name} cell" if name else "one of its values"
            return (f"{what} comes with a {which} label on {r if r >= 0.5 else 1 - r:.1%} of its "
                    f"{count} rows (all rows: {rate:.1%} positive): an outcome of the event, "
                    "unknown when serving")
    return None


def _follows_item(ids: np.ndarray, empty: np.ndarray, items: np.ndarray) -> str | None:
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    rows = ~empty & (counts[inverse] >= 2)  # a value seen once tells nothing of its item
    if rows.sum() < MIN_CELLS:
        return None
    pairs = np.stack([inverse[rows], items[rows]], 1)
    pair, per_pair = np.unique(pairs, axis=0, return_counts=True)
    best = np.zeros(int(pair[:, 0].max()) + 1, np.int64)
    np.maximum.at(best, pair[:, 0], per_pair)  # per value: the rows of its most frequent item
    share = best.sum() / rows.sum()
    if share < FOLLOWS_ITEM:
        return None
    return (f"in a log of positives only it names the row's item ({share:.0%} of a value's rows are "
            "about one item): a sampled negative would carry its positive's value")


def _follows_item_numeric(cells: pa.Array, empty: np.ndarray, items: np.ndarray) -> str | None:
    values, bad = parse_floats(cells)
    _, inverse, counts = np.unique(items, return_inverse=True, return_counts=True)
    rows = ~empty & ~bad & np.isfinite(values) & (counts[inverse] >= 2)
    if rows.sum() < MIN_CELLS:
        return None
    v, g = values[rows], inverse[rows]
    total = float(((v - v.mean()) ** 2).sum())
    if total <= 0:
        return None
    means = np.bincount(g, weights=v) / np.maximum(np.bincount(g), 1)
    explained = 1 - float(((v - means[g]) ** 2).sum()) / total
    if explained < FOLLOWS_ITEM_VARIANCE:
        return None
    return (f"in a log of positives only it follows the row's item (the item explains {explained:.0%} "
            "of its variance): a sampled negative would carry its positive's value")

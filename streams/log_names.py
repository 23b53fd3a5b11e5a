"""Which columns of a log are its user, item, time and label, and how its label reads, guessed
where the schema does not say: what a log exported by someone else needs to run as it is.

A log rarely names its columns ``user_id``, ``item_id``, ``label``, ``ts``: MovieLens writes
``userId,movieId,rating,timestamp``, a shop ``visitorid,itemid,event,timestamp``. A reserved
column whose default name is not in the header is looked for among the names such logs use
(compared in lower case without ``_``/``-``/spaces, so ``userId``, ``user_id`` and ``User ID``
are one name), in the order of the lists below; a column named for one role is never taken for
another. A label that is not 0/1 is read the way such logs mean it:

- a rating scale (at least 3 and at most :data:`SCALE_VALUES` distinct numbers, less than
  :data:`BINARY_SHARE` of the cells 0 or 1, and less than half unless at least
  :data:`SCALE_OTHERS` other values: a 0/1 label with stray cells stays 0/1, those bad rows):
  ``positive_threshold`` is the smallest value in the top quarter of the scale (4 on 1-5 and on
  0.5-5, 8 on 1-10). A "not rated" cell below the scale (Goodreads' and
  Book-Crossing's 0 on most rows, an anime list's -1) is part of the scale, so a negative;
- event types (``view``, ``addtocart``, ``add_to_cart``, ``transaction``): ``positive_values``
  are the cells that name an engagement (:data:`POSITIVE_WORDS`), when every other cell names
  an exposure or a retraction (:data:`EXPOSURE_WORDS`: ``remove_from_cart``, ``skip``);
- only positive cells (``1``, ``purchase``; ``purchase`` and ``play``), in a label column the
  caller did not name, or a label column found by its name that is empty on most rows: a log
  of positives only (``label_col = ""``, sampled negatives).

Anything else is left as it is (``--inspect`` lists the label's cells and says what to set).
Each guess is logged and returned as a note for ``--inspect``; a name or rule the schema or a
flag gives is never second-guessed. The label rule reads the first :data:`SAMPLE_ROWS` rows (a
0/1 label: its first 65,536).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streams.log_cells import (FALSE_CELLS, MONTH_DAY, SINCE_1990_MS, TRUE_CELLS, one_chunk, parse_floats, parse_times,
                               time_format_of)
from streams.log_schema import IMPLICIT_NEGATIVES, IMPLICIT_RECENT_ITEMS, ColumnSpec, LogSchema
from streams.log_source import HEADERLESS_PREFIX, column_names, read_chunks

log = logging.getLogger(__name__)

__all__ = ["ROLE_NAMES", "event_kind", "norm_name", "guess_table_key", "guess_label_rule", "guess_reserved", "guess_time_format",
           "FirstRows", "usual_name", "EXPOSURE_WORDS",
           "POSITIVE_WORDS"]

# Names per role, most specific first (normalised: lower case, letters and digits only).
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "user_col": ("userid", "user", "uid", "visitorid", "visitor", "customerid", "customer", "clientid",
                 "memberid", "accountid", "viewerid", "readerid", "listenerid", "reviewerid", "buyerid",
                 "personid", "profileid", "sessionid", "session", "uuid", "anonymousid", "anonid"),
    "item_col": ("itemid", "item", "iid", "productid", "product", "movieid", "movie", "sku", "articleid",
                 "article", "trackid", "track", "songid", "song", "videoid", "video", "contentid", "content",
                 "asin", "bookid", "book", "isbn", "adid", "adgroupid", "creativeid",  # an ad, not the page it is on
                 "docid", "documentid", "postid", "newsid", "businessid", "recipeid", "animeid", "gameid", "appid",
                 "offerid", "listingid", "courseid", "artistid", "stockcode", "productcode", "itemcode", "parentasin",
                 "productsku", "showid", "episodeid", "podcastid", "aid",
                 "reference"),  # last: a search log's clicked result (Trivago)
    "time_col": ("ts", "timestamp", "time", "eventtime", "eventtimestamp", "datetime", "timems", "timestampms",
                 "tsms", "eventtimems", "servertimestamp", "invoicedate", "transactiondate", "transactiondt",
                 "transactiontime", "purchasedate", "orderdatetime", "date", "createdat",
                 "created", "eventdate", "timestamputc", "unixtime", "epoch", "clicktime", "eventts", "unixreviewtime",
                 "dateadded", "ratedat", "watchedat", "playedat", "purchasedat", "orderdate", "tdat"),
    "label_col": ("label", "click", "clicked", "isclick", "clicks", "clk", "isclk", "target", "y", "rating", "stars",
                  "overall", "bookrating", "reward", "purchase", "purchased", "converted", "conversion", "liked",
                  "like", "feedback", "event", "eventtype", "action", "actiontype", "productaction", "interaction",
                  "behavior", "behaviour", "behaviortype", "behaviourtype"),
}
SCALE_VALUES = 20  # a numeric label with at most this many distinct values is a rating scale
SCALE_TOP = 0.75  # its positives: values at or above this point of the scale
NOT_RATED_SHARE = 0.3  # a scale's lowest value on this share of the rows is "not rated" (noted)
SAMPLE_ROWS = 1 << 18
CONTENT_ROWS = 1 << 16  # rows a headerless log's roles are guessed from
MOSTLY_EMPTY = 0.5  # a user or item column empty on more of its first rows gives way to the next name
BINARY_SHARE = 0.95  # a label with this share of 0/1 cells is 0/1 (the rest are bad cells)...
SCALE_OTHERS = 3  # ...or with half, unless it has this many other values (0 = "not rated", 1-5)
_ONES = frozenset(("1", "1.0", *TRUE_CELLS))
_BINARY = _ONES | {"0", "0.0", *FALSE_CELLS}
POSITIVE_WORDS = frozenset((
    "click", "clicked", "purchase", "purchased", "buy", "bought", "transaction", "order", "ordered",
    "checkout", "addtocart", "cart", "add", "added", "like", "liked", "favorite", "favourite", "fav", "play",
    "played",
    "watch", "watched", "listen", "listened", "share", "shared", "convert", "converted", "conversion",
    "download", "downloaded", "subscribe", "subscribed", "save", "saved", "yes", "positive", "pos"))
EXPOSURE_WORDS = frozenset((
    "view", "viewed", "pageview", "pv", "imp", "impression", "impressions", "show", "shown", "display", "displayed",
    "expose", "exposure", "skip", "skipped", "dislike", "disliked", "ignore", "ignored", "no", "negative",
    "neg", "none", "detail", "browse", "search", "searched", "removefromcart", "removefromwishlist", "remove",
    "removed", "unlike",
    "unfavorite", "unfavourite", "unsubscribe", "unsubscribed", "return", "returned", "refund", "hide", "hidden"))


def norm_name(name: str) -> str:
    """A column name as names are compared: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


_DRESS = re.compile(r"^(hashed)|(hash|hashed|epochms|epochs|epoch)$")


def _variants(name: str) -> list[str]:
    """A column's name less what exports add to it: a hash or epoch suffix (Coveo's
    ``session_id_hash``, ``server_timestamp_epoch_ms``), a nested object's path
    (``properties.product_id``)."""
    out = [_DRESS.sub("", norm_name(name))]
    if "." in name:
        out.append(norm_name(name.rsplit(".", 1)[1]))
    return [v for v in out if v and v != norm_name(name)]


def event_kind(cell: str) -> str | None:
    """``"positive"`` where an event cell names an engagement, ``"exposure"`` an exposure or a
    retraction, else None: compared as names are (``add_to_cart`` and ``AddToCart`` alike), in
    the singular (OTTO's ``clicks``, ``carts``, ``orders``); a phrase by its last known word
    (Segment's ``Product Viewed``, ``Product Added to Wishlist``, ``Order Completed``)."""
    def kind(word: str) -> str | None:
        for w in (word, word[:-1] if word.endswith("s") else ""):
            if w in POSITIVE_WORDS:
                return "positive"
            if w in EXPOSURE_WORDS:
                return "exposure"
        return None
    found = kind(norm_name(cell))
    if found is None:
        words = [w for w in re.split(r"[^a-z0-9]+", cell.lower()) if w]
        found = next((k for k in map(kind, reversed(words)) if k is not None), None) if len(words) > 1 else None
    return found


def guess_reserved(header: list[str], schema: LogSchema, given: set[str],
                   first: FirstRows | None = None) -> tuple[LogSchema, list[str]]:
    """``schema`` with each reserved column the caller did not name (``given``) and whose current
    name is not in ``header`` replaced by the header's column of a known name for the role; and
    one note per guess. The label is guessed only where the schema still has a label column. Given
    the log's ``first`` rows: a user or item column empty on most of them (Diginetica's ``userId``
    beside its ``sessionId``) is passed over for the next name, if the header has one; so is a
    label column whose cells do not read as a label when a later one's do (Coveo's
    ``event_type`` beside its ``product_action``)."""
    taken = {c for c in schema.reserved() if c in header}
    by_norm = _by_name(header)
    changes: dict[str, str] = {}
    notes: list[str] = []
    for role, names in ROLE_NAMES.items():
        current = getattr(schema, role)
        if role in given or current in header or (role == "label_col" and schema.implicit):
            continue
        candidates = [by_norm[n] for n in names if n in by_norm and by_norm[n] not in taken]
        passed = []
        if len(candidates) > 1 and role in ("user_col", "item_col") and first is not None:
            # Passed over for the first that is filled mostly; if none is, none is passed over.
            filled = next((c for c in candidates if first.empty_share(c) <= MOSTLY_EMPTY), candidates[0])
            passed = [f"; {c!r} is empty on {first.empty_share(c):.0%} of its first rows"
                      for c in candidates[:candidates.index(filled)]]
            candidates = candidates[candidates.index(filled):]
        if role == "label_col" and first is not None and len(candidates) > 1:
            readable = [c for c in candidates if first.reads_as_label(c)]
            if readable and readable[0] != candidates[0]:
                passed.append(f"; {candidates[0]!r} holds neither numbers nor known event words")
                candidates = readable
        if not candidates:
            continue
        found = candidates[0]
        taken.add(found)
        changes[role] = found
        notes.append(f"{role} = {found!r}: the log has no {current!r} column; {found!r} is a usual name for "
                     f"it{''.join(passed)}")
    for note in notes:
        log.warning("reading %s", note)
    return (replace(schema, **changes) if changes else schema), notes


def guess_table_key(schema: LogSchema, header: list[str], given: Mapping[str, Any],
                    side: str = "item") -> tuple[LogSchema, list[str]]:
    """``schema`` with its item (or ``side = "user"``: user) table's id column (``items_key``)
    found by a usual item name where the schema names none and the table has no column of the
    log's item column's name (MIND's ``news_id`` beside the items an impressions column lists),
    or its first column where it has no header line (MovieLens 100K's ``u.item``); where the log
    (of columns ``header``) has that column too and the caller named no item column, it is the
    log's item (Amazon 2023's reviews carry ``asin`` and ``parent_asin``; its metadata lists
    parents). The note."""
    file, key, role = getattr(schema, f"{side}s_file"), f"{side}s_key", f"{side}_col"
    if not file or getattr(schema, key):
        return schema, []
    table = column_names(file)
    if table and all(c.startswith(HEADERLESS_PREFIX) for c in table):  # MovieLens 100K's u.item: ids first
        if getattr(schema, role) == table[0]:
            return schema, []
        note = f"{key} = {table[0]!r}: the {side} table has no header line; its first column is the {side}"
        log.warning("reading %s", note)
        return replace(schema, **{key: table[0]}), [note]
    if getattr(schema, role) in table:
        return schema, []
    found = usual_name(table, role)
    if found is None:
        return schema, []
    if found in header and role not in given:
        note = (f"{role} = {found!r}: the {side} table lists its {side}s by {found!r}, a column of the log too "
                f"(not {getattr(schema, role)!r})")
        schema = replace(schema, **{role: found})
    else:
        note = (f"{key} = {found!r}: the {side} table has no {getattr(schema, role)!r} column; {found!r} is a "
                f"usual name for the {side}")
        schema = replace(schema, **{key: found})
    log.warning("reading %s", note)
    return schema, [note]


def _by_name(header: list[str]) -> dict[str, str]:
    """Normalised name -> column: each column's own name, then its :func:`_variants`."""
    by_norm: dict[str, str] = {}
    for col in header:
        by_norm.setdefault(norm_name(col), col)
    for col in header:  # then as exports dress names: session_id_hash, properties.product_id
        for variant in _variants(col):
            by_norm.setdefault(variant, col)
    return by_norm


def usual_name(header: list[str], role: str) -> str | None:
    """The header's first column of a usual name for ``role`` (``"item_col"``)."""
    by_norm = _by_name(header)
    return next((by_norm[n] for n in ROLE_NAMES[role] if n in by_norm), None)


class FirstRows:
    """A log's first :data:`CONTENT_ROWS` rows, read once when first asked: what a guess by
    name checks against the content."""

    def __init__(self, path: str | Path) -> None:
        self.path, self._table = path, None

    def _column(self, column: str) -> pa.Array | None:
        if self._table is None:
            chunk = next(iter(read_chunks(self.path, CONTENT_ROWS)), None)
            self._table = chunk.table if chunk is not None else pa.table({})
        if column not in self._table.column_names or not self._table.num_rows:
            return None
        return pc.fill_null(pc.utf8_trim_whitespace(one_chunk(self._table.column(column))), "")

    def empty_share(self, column: str) -> float:
        cells = self._column(column)
        return 0.0 if cells is None else float(pc.sum(pc.equal(cells, "")).as_py() or 0) / len(cells)

    def reads_as_label(self, column: str) -> bool:
        """Whether its cells are 0/1, numbers, or known event words (Coveo's ``product_action``;
        not its ``event_type``, ``event_product`` beside ``pageview``)."""
        cells = self._column(column)
        if cells is None:
            return False
        values = [v for v in pc.unique(cells).to_pylist() if v]
        if not values or len(values) > 1000:
            return False
        if all(v.lower() in _BINARY or event_kind(v) is not None for v in values):
            return True
        return not parse_floats(pa.array(values, pa.string()))[1].any()


def guess_time_format(path: str | Path, schema: LogSchema) -> tuple[LogSchema, list[str]]:
    """``schema`` with the ``time_format`` its time column's first :data:`CONTENT_ROWS` cells are
    written in, where they are neither epoch numbers nor ISO-8601 and the schema names none
    (:func:`streams.log_cells.time_format_of`: ``11/9/2019 12:00:27 AM``, ``20220408``); the note."""
    if not schema.time_col or schema.time_format:
        return schema, []
    chunk = next(iter(read_chunks(path, CONTENT_ROWS)), None)
    if chunk is None or schema.time_col not in chunk.table.column_names:
        return schema, []
    cells = one_chunk(chunk.table.column(schema.time_col))
    fmt = time_format_of(cells)
    if fmt == "":  # numbers: a month and day with no year (Tmall's 829, 1103) if all read so and none is a time
        ms, empty, bad = parse_times(cells)
        if (ms[~empty] < SINCE_1990_MS).all() and (~parse_times(cells, MONTH_DAY)[2][~empty]).all():
            fmt = MONTH_DAY
    if not fmt:
        return schema, []
    ms, empty, bad = parse_times(cells, fmt)
    first = int(np.flatnonzero(~empty & ~bad)[0])
    note = (f"time_format = {fmt!r}: the time {schema.time_col!r} is neither epoch numbers nor ISO-8601; "
            f"{cells[first].as_py()!r} reads as {np.datetime64(int(ms[first]), 'ms')}"
            + (" (no year: 2000 is taken)" if fmt == MONTH_DAY else ""))
    if fmt.startswith("%m/%d") and time_format_of(pc.replace_substring_regex(
            cells, r"^(\d+)/(\d+)/", r"\2/\1/")) == fmt:
        note += " (every day in the first rows is 12 or less: if the log writes the day first, set %d/%m)"
    log.warning("reading %s", note)
    return replace(schema, time_format=fmt), [note]


COUNT_VALUES = 10  # a label of whole numbers from 1, 1 the most common, with more values is a count


def _counts(counts: Counter[str]) -> bool:
    """Cells that count (the Million Song Dataset's and Last.fm's plays): whole numbers from 1, 1
    the most common, more than :data:`COUNT_VALUES` values (a rating scale has fewer)."""
    if len(counts) <= COUNT_VALUES or not all(c.isdigit() for c in counts):
        return False
    values = {int(c): n for c, n in counts.items()}
    return min(values) == 1 and max(values, key=values.get) == 1


def guess_label_rule(path: str | Path, schema: LogSchema, label_named: bool = False,
                     label_guessed: bool = False) -> tuple[LogSchema, list[str]]:
    """``schema`` with ``positive_threshold`` or ``positive_values`` set from the label's cells
    when they are a rating scale or event types (module docstring), and the note saying so;
    unchanged where the label is 0/1, boolean, already has a rule, or is something else. A label
    the caller did not name (``label_named``) whose every cell is one positive (``1``, ``true``,
    ``purchase``) marks a log of positives only: the schema becomes implicit; so does a label
    column found by its name (``label_guessed``) that is empty on most rows (a rating beside
    plays: as the label it would drop those rows)."""
    if schema.implicit or schema.positive_threshold is not None or schema.positive_values:
        return schema, []
    counts: Counter[str] = Counter()
    rows = empty = 0
    for chunk in read_chunks(path, 1 << 16):
        if schema.label_col not in chunk.table.column_names:
            return schema, []  # the label comes from elsewhere (an item table): not guessed here
        column = one_chunk(pc.utf8_trim_whitespace(chunk.table.column(schema.label_col)))
        if schema.item_col in chunk.table.column_names:  # rows about no item (a search, a page) are no example
            items = pc.fill_null(pc.utf8_trim_whitespace(one_chunk(chunk.table.column(schema.item_col))), "")
            column = column.filter(pc.not_equal(items, ""))
        counts.update({c["values"]: c["counts"] for c in pc.value_counts(column).to_pylist() if c["values"]})
        rows += len(column)
        empty = rows - sum(counts.values())
        binary = sum(n for c, n in counts.items() if c.lower() in _BINARY)
        others = sum(c.lower() not in _BINARY for c in counts)
        if len(counts) > 1 and (binary >= BINARY_SHARE * sum(counts.values())
                                or (2 * binary >= sum(counts.values()) and others < SCALE_OTHERS)):
            return schema, []  # 0/1 (or true/false): the other cells are bad rows, not a scale
        if rows >= SAMPLE_ROWS or len(counts) > 1000:
            break
    why, columns = None, schema.columns
    if len(counts) == 1 and not label_named and (next(iter(counts)).lower() in _ONES
                                                  or event_kind(next(iter(counts))) == "positive"):
        why = f"every cell of {schema.label_col!r} is {next(iter(counts))!r}"
    elif counts and not label_named and all(event_kind(c) == "positive" for c in counts):
        why = f"every cell of {schema.label_col!r} names an engagement ({', '.join(sorted(counts))})"
        if schema.label_col not in {c.name for c in columns}:  # which engagement: an outcome, no feature
            columns += (ColumnSpec(schema.label_col, "ignore", "user"),)
    elif label_guessed and not label_named and 2 * empty > rows:
        why = f"{schema.label_col!r} is empty on {empty} of its first {rows} rows, so it is no label"
    elif not label_named and _counts(counts):
        why = (f"{schema.label_col!r} counts (whole numbers from 1, 1 the most common, "
               f"{len(counts)} values): plays or purchases, each row a positive")
        if schema.label_col not in {c.name for c in columns}:  # a count is known after the fact: no feature
            columns += (ColumnSpec(schema.label_col, "ignore", "user"),)
    if why is not None:
        negatives, recent = schema.negatives or IMPLICIT_NEGATIVES, schema.recent_items or IMPLICIT_RECENT_ITEMS
        note = (f'label_col = "": {why}; the log holds positives only: each row gets {negatives} sampled '
                f"negatives and the user's last {recent} items")
        log.warning("reading %s", note)
        return replace(schema, label_col="", negatives=negatives, recent_items=recent, columns=columns), [note]
    cells = set(counts)
    values, bad = parse_floats(pa.array(sorted(cells), pa.string()))
    note = None
    scale = np.unique(values)
    if cells and not bad.any() and np.isfinite(values).all() and 3 <= len(scale) <= SCALE_VALUES:
        threshold = float(scale[scale >= scale[0] + SCALE_TOP * (scale[-1] - scale[0])][0])
        schema = replace(schema, positive_threshold=threshold)
        note = (f"positive_threshold = {threshold:g}: the label {schema.label_col!r} is a scale of "
                f"{len(scale)} values from {scale[0]:g} to {scale[-1]:g}; a value >= {threshold:g} is a positive")
        lowest = sum(counts[c] for c, v in zip(sorted(cells), values) if v == scale[0])
        if lowest >= NOT_RATED_SHARE * sum(counts.values()):
            note += (f" ({scale[0]:g}, on {lowest / sum(counts.values()):.0%} of the rows, likely "
                     "'not rated', is a negative)")
    elif cells and all(event_kind(c) is not None for c in cells):
        positive = tuple(sorted(c for c in cells if event_kind(c) == "positive"))
        if positive and len(positive) < len(cells):
            schema = replace(schema, positive_values=positive)
            note = (f"positive_values = {list(positive)}: the label {schema.label_col!r} names events "
                    f"{sorted(cells)}; those that are an engagement are positives")
    if note is None:
        return schema, []
    log.warning("reading %s", note)
    return schema, [note]

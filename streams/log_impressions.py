"""A log whose rows each list the items a user was shown, read as one row per shown item.

An impression log writes one row per page or feed load: MIND's ``behaviors.tsv`` has
``N55689-1 N35729-0 N20678-0`` (each shown news item, ``-1`` where it was clicked); a search log
lists the ``impressions`` of a results page beside the ``reference`` clicked among them. Read
as it is, such a row is one example of an item that is not there; what a recommender learns
from is each shown item with its label, all of one request. ``impressions_col`` names the
column; its cell is a list separated by spaces or ``|``; a row becomes one row per listed item,
the row's other cells repeated (the user's ``history`` too), in two shapes:

- the log has no item column: each listed item is ``ITEM-1`` or ``ITEM-0``, the label its end;
- the log's item column names the item engaged with: it is the positive among the listed items,
  the others negatives (an engaged item missing from the list adds nothing).

A listed item that is not ``ITEM-0``/``ITEM-1`` (a test split without labels) keeps an empty
label, and an empty list an empty item: bad rows, with their line, as any other.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from streams.log_cells import one_chunk
from streams.log_names import norm_name, usual_name
from streams.log_schema import LogSchema
from streams.log_source import RawChunk, read_chunks

log = logging.getLogger(__name__)

__all__ = ["explode", "guess_impressions", "produced_columns"]

NAMES = ("impressions", "impression", "impressionlist", "impressed", "shown", "shownitems", "displayed",
         "displayeditems", "exposures", "candidates")  # lower case, letters and digits only
LABELLED_SHARE = 0.95  # a column this share of whose non-empty cells are lists of ITEM-0/1 holds impressions
SAMPLE_ROWS = 4096
_SPLIT = r"[\s|]+"
_TOKEN = r"^(?P<item>.+)-(?P<label>[01])$"
_LABELLED_CELL = r"^\S+-[01]([\s|]+\S+-[01])*$"


def produced_columns(header: list[str], schema: LogSchema) -> list[str]:
    """The columns reading an impression log adds to ``header``: its item and label columns
    (the item column replaced where the header has one: it names the engaged item)."""
    if not schema.impressions_col:
        return []
    return [c for c in (schema.item_col, schema.label_col) if c not in header]


def explode(chunk: RawChunk, schema: LogSchema) -> RawChunk:
    """One row per item of ``schema.impressions_col``'s lists (the module's two shapes)."""
    table = chunk.table
    cells = pc.utf8_trim_whitespace(pc.fill_null(one_chunk(table.column(schema.impressions_col)), ""))
    lists = pc.split_pattern_regex(cells, _SPLIT)
    parent = pc.list_parent_indices(lists)
    tokens = pc.list_flatten(lists)
    tokens = pc.if_else(pc.equal(tokens, ""), pa.scalar(None, pa.string()), tokens)
    out = table.drop_columns([schema.impressions_col]).take(parent)
    if schema.item_col in out.column_names:  # the row's item was engaged with, among those listed
        engaged = pc.utf8_trim_whitespace(one_chunk(out.column(schema.item_col)))
        label = pc.if_else(pc.equal(tokens, engaged), "1", "0")
        label = pc.if_else(tokens.is_null(), pa.scalar(None, pa.string()), label)
        out = out.drop_columns([schema.item_col])
        item = tokens
    else:
        parts = pc.extract_regex(tokens, _TOKEN)
        item = pc.if_else(parts.is_valid(), parts.field("item"), tokens)
        label = parts.field("label")
    if schema.label_col in out.column_names:
        out = out.drop_columns([schema.label_col])
    out = out.append_column(schema.item_col, item).append_column(schema.label_col, label)
    return RawChunk(out, chunk.line[parent.to_numpy(zero_copy_only=False)], chunk.invalid)


def _labelled_share(cells: pa.Array) -> float:
    """The share of non-empty cells that are lists of ``ITEM-0``/``ITEM-1``; 0 unless most
    hold several (one ``SKU-1`` per cell is an id)."""
    cells = pc.utf8_trim_whitespace(pc.fill_null(cells, ""))
    filled = cells.filter(pc.not_equal(cells, ""))
    if not len(filled) or 2 * (pc.sum(pc.match_substring_regex(filled, r"\S[\s|]+\S")).as_py() or 0) < len(filled):
        return 0.0
    return float(pc.sum(pc.match_substring_regex(filled, _LABELLED_CELL)).as_py() or 0) / len(filled)


def guess_impressions(path: str | Path, header: list[str], schema: LogSchema,
                      given: Iterable[str]) -> tuple[LogSchema, list[str]]:
    """``schema`` with ``impressions_col`` set where the caller named none and the log has a
    column of impressions: lists of ``ITEM-0``/``ITEM-1`` (by content, whatever its name: a
    headerless MIND export), or a column of a usual name for them (:data:`NAMES`) beside the
    log's item column; and the note saying so."""
    if schema.impressions_col or "impressions_col" in given or not header:
        return schema, []
    chunk = next(iter(read_chunks(path, SAMPLE_ROWS)), None)
    if chunk is None:
        return schema, []
    found = why = None
    for col in header:
        share = _labelled_share(one_chunk(chunk.table.column(col)))
        if share >= LABELLED_SHARE and col not in (schema.user_col, schema.time_col):
            found, why = col, (f"{share:.0%} of its cells are lists of ITEM-1/ITEM-0 (shown items, "
                               "1 where clicked)")
            break
    item = schema.item_col if schema.item_col in header or "item_col" in given else usual_name(header, "item_col")
    if found is None and item in header and "label_col" not in given and schema.label_col not in header:
        found = next((c for c in header if norm_name(c) in NAMES and c != item), None)
        why = f"its name says so, and {item!r} names the item engaged with among them"
        if found is not None and item != schema.item_col:
            why += f" (item_col = {item!r}: a usual name for it)"
            schema = replace(schema, item_col=item)
    if found is None:
        return schema, []
    note = (f"impressions_col = {found!r}: {why}; each row is read as one row per listed item, "
            f"with its label, all one request")
    log.warning("reading %s", note)
    return replace(schema, impressions_col=found), [note]

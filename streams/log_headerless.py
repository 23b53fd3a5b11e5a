"""The roles of a log's columns when it has no header line (every column ``column_N``), guessed
from its first rows by the order such files keep (MovieLens' ``u.data``: user, item, rating,
time; Taobao's ``UserBehavior.csv``; Last.fm's TSV; MIND's ``behaviors.tsv``)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streams.log_cells import SINCE_1990_MS, one_chunk, parse_floats, parse_times, time_format_of
from streams.log_names import CONTENT_ROWS, SCALE_VALUES, ROLE_NAMES, event_kind
from streams.log_schema import LogSchema
from streams.log_source import HEADERLESS_PREFIX, read_chunks

log = logging.getLogger(__name__)

__all__ = ["guess_headerless"]

HEADERLESS_COLUMNS = 12  # a headerless log of more columns has its user and item named, not guessed
BEFORE_2100_MS = 4_102_444_800_000  # a headerless time is before 2100 (not a stream id read as seconds)
ROW_NUMBER_ROWS = 200  # a headerless column distinct on this many first rows or more numbers them


def guess_headerless(path: str | Path, header: list[str], schema: LogSchema,
                     given: Mapping[str, Any]) -> tuple[LogSchema, list[str]]:
    """For a CSV without a header line (every column ``column_N``): the roles the caller did not
    name, from the first :data:`CONTENT_ROWS` rows, by the order such files keep (MovieLens'
    ``u.data``: user, item, rating, time; Taobao's ``UserBehavior.csv``: user, item, category,
    behaviour, time): the time is the first column of times from 1990 to 2100 (epoch seconds or
    ms, ISO-8601, a format :func:`~streams.log_cells.time_format_of` knows); the user and the item
    the first two other columns with no empty cell (Last.fm's artist id is empty on some rows, its
    name never), none of fractions, two values or a distinct value per row, and none guessed
    among more than :data:`HEADERLESS_COLUMNS` columns; the label the first later
    column of at most :data:`SCALE_VALUES` distinct numbers within +-100 (not codes) or of event
    words; a column the caller names for a role (``given``: role -> column, or the schema
    naming one of the header's ``column_N``) is left out. Notes as :func:`guess_reserved`'s."""
    if not header or not all(c.startswith(HEADERLESS_PREFIX) for c in header):
        return schema, []
    given = {**{role: getattr(schema, role) for role in ROLE_NAMES if getattr(schema, role) in header},
             **{k: v for k, v in given.items() if k in ROLE_NAMES}}
    table = next(iter(read_chunks(path, CONTENT_ROWS)), None)
    if table is None or not table.table.num_rows:
        return schema, []
    named = {v for k, v in given.items() if k in ROLE_NAMES}
    free = [c for c in header if c not in named]
    cols = {c: pc.utf8_trim_whitespace(one_chunk(table.table.column(c))) for c in free}
    changes: dict[str, str] = {}
    time = next((c for c in free if _is_time(cols[c])), None)
    if time is not None:
        changes["time_col"] = time
    rest = [c for c in free if c != time and pc.any(pc.not_equal(cols[c], "")).as_py()]  # not all empty ("::")
    ids = [role for role in ("user_col", "item_col") if role not in given and len(header) <= HEADERLESS_COLUMNS]
    # No user or item: a column of fractions (a rating), or of enough rows whose every cell differs
    # (a row's own number, MIND's impression id) or of two values (a 0/1 label); and none is
    # guessed among more than HEADERLESS_COLUMNS columns (Criteo's 40, a wide matrix of ratings).
    ids_from = [c for c in rest if not _fractions(cols[c]) and (
        len(cols[c]) < ROW_NUMBER_ROWS or 2 < pc.count_distinct(cols[c]).as_py() < len(cols[c]))]
    complete = [c for c in ids_from if cols[c].null_count == 0 and not pc.any(pc.equal(cols[c], "")).as_py()]
    id_cols = (complete if len(complete) >= len(ids) else ids_from)[:len(ids)]
    changes.update(zip(ids, id_cols))
    after = rest.index(id_cols[-1]) + 1 if id_cols else 0
    label = next((c for c in rest[after:] if _is_label(cols[c])), None)
    if label is not None and not schema.implicit:
        changes["label_col"] = label
    changes = {k: v for k, v in changes.items() if k not in given}
    what = {"user_col": "user", "item_col": "item", "time_col": "time", "label_col": "label"}
    notes = [f"{role} = {col!r}: the log has no header line; column {col.removeprefix(HEADERLESS_PREFIX)} "
             f"reads as the {what[role]}" for role, col in sorted(changes.items(), key=lambda kv: header.index(kv[1]))]
    for note in notes:
        log.warning("reading %s", note)
    return (replace(schema, **changes) if changes else schema), notes


def _is_time(cells: pa.Array) -> bool:
    """Times after 1990 (not small ids), in any format :func:`time_format_of` knows."""
    fmt = time_format_of(cells)
    if fmt is None:
        return False
    ms, empty, bad = parse_times(cells, fmt)
    ms = ms[~empty]
    return bool(len(ms)) and not bad.any() and bool(((ms >= SINCE_1990_MS) & (ms < BEFORE_2100_MS)).all())


def _fractions(cells: pa.Array) -> bool:
    """Numbers (empty cells aside), some with a fraction (-7.82): ratings or measures, no ids."""
    values, bad = parse_floats(cells)
    values = values[np.isfinite(values)]
    return bool(not bad.any() and (values != np.round(values)).any())


def _is_label(cells: pa.Array) -> bool:
    values = [v for v in pc.unique(cells).to_pylist() if v]
    if not values or len(values) > SCALE_VALUES:
        return False
    if all(event_kind(v) is not None for v in values):
        return True
    numbers, bad = parse_floats(pa.array(values, pa.string()))
    return not bad.any() and bool((np.abs(numbers) <= 100).all())  # a rating, not a category code

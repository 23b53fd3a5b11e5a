"""An item attributes table beside the log: joined onto every row by item id as it is read;
and, the same way, a user attributes table by user id (``users_file``, ``--user-table``: H&M's
``customers.csv``, MovieLens 1M's ``users.dat``, Book-Crossing's ``BX-Users.csv``).

Logs often come as interactions plus an item table (MovieLens' ``ratings.csv`` and
``movies.csv``, a shop's events and its catalog export). ``items_file`` in the schema (or
``--item-table FILE`` on replay, demo and bench learning) names the table, in any format a log
may have (CSV, TSV, Parquet, JSON Lines); ``items_key`` its id column (default: the log's item
column). Each of its other columns becomes a column of the log, so inference, encoding and
replay see a joined log: an item's attributes are constant per item (inferred
``side = "item"``), an item the table does not list reads empty cells (counted in
``ItemTable.unmatched``). Ids match as ids, spaces trimmed (``10.0`` finds ``10``:
:func:`~streams.log_schema.entity_ids`). The table is read whole (item tables are small beside
their logs) and once per process; an id listed twice with different cells (a row repeated cell for cell is read once,
with a warning), an empty id, a bad row or a column name the log already has is an error
naming the file.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streams.log_schema import LogSchema, entity_ids
from streams.log_impressions import explode, produced_columns
from streams.log_source import RawChunk, check_columns, column_names, read_chunks
from streams.wire import SchemaError

log = logging.getLogger(__name__)

__all__ = ["ItemTable", "item_table", "log_columns", "read_log_chunks", "user_table"]


class ItemTable:
    """An attributes file's columns as strings, and where each id's row is: of items, or (``side
    = "user"``) of users."""

    def __init__(self, path: str | Path, key: str, side: str = "item") -> None:
        self.path, self.key, self.side = str(path), key, side
        what = f"{side} table"
        tables, lines = [], []
        for chunk in read_chunks(path):
            if chunk.invalid:
                b = chunk.invalid[0]
                raise SchemaError(f"{what} {b.message(path)}")
            tables.append(chunk.table)
            lines.extend(chunk.line.tolist())
        names = column_names(path)
        if key not in names:
            raise SchemaError(f"{what} {path}: no id column {key!r} (columns: {names})")
        table = pa.concat_tables(tables) if tables else pa.table({n: pa.array([], pa.string()) for n in names})
        ids = pc.utf8_trim_whitespace(table.column(key).combine_chunks())
        empty = pc.fill_null(pc.equal(ids, ""), True).to_numpy(zero_copy_only=False)
        if empty.any():
            raise SchemaError(f"{what} {path}, line {lines[int(empty.argmax())]}: empty {key!r}")
        table, ids, lines = _copies_dropped(path, table, ids, lines)
        counts = pc.value_counts(ids)
        dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        if len(dup):
            first = dup[0].as_py()
            where = [lines[i] for i in pc.indices_nonzero(pc.equal(ids, first)).to_pylist()[:2]]
            raise SchemaError(f"{what} {path}: {side} {first!r} is listed twice (lines {where[0]} "
                              f"and {where[1]}); {len(dup)} ids repeat")
        # Matched as ids, not text: "123.0" in one file is item 123 in the other (entity_ids).
        keys = entity_ids(side, ids)
        uniq, counts = np.unique(keys, return_counts=True)
        if (counts > 1).any():
            twice = ids.take(pa.array(np.flatnonzero(keys == uniq[counts > 1][0]))).to_pylist()
            raise SchemaError(f"{what} {path}: {twice[0]!r} and {twice[1]!r} are one {side}, listed twice")
        self.keys = pa.array(keys)
        self.joined = self.unmatched = 0  # log rows joined so far, and those whose item it does not list
        self.columns = [n for n in names if n != key]
        self.table = table.select(self.columns).combine_chunks()
        log.info("%s %s: %d %ss, columns %s", what, path, len(ids), side, self.columns)

    def names_beside(self, header: list[str]) -> list[str]:
        """Its columns' names beside a log of columns ``header``: one the log has too (a review's
        ``title`` beside the product's) is ``item.NAME`` (``user.NAME``)."""
        return [f"{self.side}.{n}" if n in header else n for n in self.columns]

    def join(self, table: pa.Table, id_col: str) -> pa.Table:
        """``table`` with the table's columns appended (:meth:`names_beside`), matched on ``id_col``."""
        cells = pc.utf8_trim_whitespace(table.column(id_col).combine_chunks())
        at = pc.index_in(pa.array(entity_ids(self.side, pc.fill_null(cells, ""))), value_set=self.keys)
        self.joined += len(at)
        self.unmatched += at.null_count
        out = table
        for name, as_name in zip(self.columns, self.names_beside(table.column_names)):
            out = out.append_column(as_name, self.table.column(name).take(at))
        return out


def _copies_dropped(path: str | Path, table: pa.Table, ids: pa.Array,
                    lines: list[int]) -> tuple[pa.Table, pa.Array, list[int]]:
    """The table without rows that repeat an earlier row cell for cell (catalog exports, Amazon's
    metadata among them, list some items twice, identically): the item is read once, with a
    warning. Rows of one id that differ are left for the caller to refuse."""
    keys = pa.table({f"c{k}": pc.fill_null(table.column(k).cast(pa.string()), "\x00")
                     for k in range(table.num_columns)})
    keys = keys.append_column("row", pa.array(np.arange(table.num_rows), pa.int64()))
    firsts = keys.group_by([f"c{k}" for k in range(table.num_columns)], use_threads=False).aggregate(
        [("row", "min")]).column("row_min")
    if len(firsts) == table.num_rows:
        return table, ids, lines
    keep = np.sort(firsts.to_numpy())
    log.warning("item table %s: %d rows repeat an earlier row cell for cell: each such item is read once",
                path, table.num_rows - len(keep))
    at = pa.array(keep, pa.int64())
    return table.take(at), ids.take(at), [lines[r] for r in keep]


@functools.lru_cache(maxsize=4)
def _load(path: str, key: str, side: str, mtime_ns: int) -> ItemTable:
    return ItemTable(path, key, side)


def _table(file: str, key: str, side: str) -> ItemTable | None:
    if not file:
        return None
    path = Path(file)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as exc:
        raise SchemaError(f"{side} table {path}: {exc.strerror or exc}") from None
    return _load(str(path), key, side, mtime)


def item_table(schema: LogSchema) -> ItemTable | None:
    """The schema's item table (read once per process and file version), or None."""
    return _table(schema.items_file, schema.items_key or schema.item_col, "item")


def user_table(schema: LogSchema) -> ItemTable | None:
    """The schema's user table (H&M's ``customers.csv``, MovieLens 1M's ``users.dat``), or None."""
    return _table(schema.users_file, schema.users_key or schema.user_col, "user")


def log_columns(path: str | Path, schema: LogSchema) -> list[str]:
    """The log's columns as read with ``schema``: its header (less an impressions column), the
    item and label columns an impressions column makes, then the item table's columns, after
    checking the reserved and described columns are among them."""
    raw = column_names(path)
    header = [c for c in raw + produced_columns(raw, schema) if c != schema.impressions_col]
    for table in (item_table(schema), user_table(schema)):
        if table is None:
            continue
        clash = sorted(set(table.columns) & set(header))
        if clash:
            log.warning("%s table %s: columns %s are in the log %s too: read as %s", table.side, table.path, clash,
                        path, [f"{table.side}.{c}" for c in clash])
        header = header + table.names_beside(header)
    check_columns(path, schema, header + ([schema.impressions_col] if schema.impressions_col else []))
    return header


def read_log_chunks(path: str | Path, schema: LogSchema, chunk_rows: int = 65536) -> Iterator[RawChunk]:
    """:func:`streams.log_source.read_chunks` with an impressions column read as a row per
    listed item (:mod:`streams.log_impressions`), and the schema's item and user tables joined on."""
    items, users = item_table(schema), user_table(schema)
    for chunk in read_chunks(path, chunk_rows):
        if schema.impressions_col:
            chunk = explode(chunk, schema)
        if items is not None:
            chunk = RawChunk(items.join(chunk.table, schema.item_col), chunk.line, chunk.invalid)
        if users is not None:
            chunk = RawChunk(users.join(chunk.table, schema.user_col), chunk.line, chunk.invalid)
        yield chunk

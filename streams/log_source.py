"""Reads a log file in chunks of string columns, and parses the cells every row must have
(with :mod:`streams.log_cells`). A log without a time column is in time order already: its rows
are one second apart, in file order (``FILE_ORDER_EPOCH_MS`` + line * 1 s).

CSV (``.csv``, ``.csv.gz`` and whatever else pyarrow detects by extension) streams through
``pyarrow.csv.open_csv`` with every column read as a string, so an empty cell is explicit (null)
and no column's type is guessed from its first block. Its delimiter is a tab for ``.tsv`` /
``.tab``, else sniffed from the first lines among comma, tab and semicolon (European exports).
Parquet (a file, or a directory of them: a Spark/Hive export, read as one log in path order)
streams through ``ParquetFile.iter_batches`` (a directory: ``pyarrow.dataset``); a directory of
CSV or JSON Lines parts is their concatenation. Parquet's typed columns are turned into the same
strings (timestamps as ISO-8601, lists joined with ``|``), so one code path handles every
format; JSON Lines likewise (:mod:`streams.log_jsonl`).

Line numbers: a CSV row's number is its record number counting the header as 1 (the physical
line unless a quoted cell holds a newline; without a header line the first record is 1); a
Parquet row's is its 1-based row index (across a directory's files); a JSON Lines row's is its
line.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from streams.log_formats import (DOUBLE_COLON, csv_block_size, csv_delimiter, csv_encoding, csv_source, data_files,
                                 is_data_row, is_directory_log, is_json_lines, is_parquet, parquet_parts,
                                 text_encoding)
from streams.log_cells import one_chunk, parse_floats, parse_labels, parse_times
from streams.log_jsonl import NEST_DEPTH, cell_string, json_lines_chunks, json_lines_columns, rows_key
from streams.log_schema import LogSchema, entity_ids
from streams.wire import SchemaError

FILE_ORDER_EPOCH_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z: line 0 of a log without times


@dataclass
class BadRow:
    """A row that cannot be used, with where and why (dead-lettered or raised)."""

    line: int
    column: str
    reason: str
    raw: str

    def message(self, path: str | Path) -> str:
        return f"{path}, line {self.line}, column {self.column!r}: {self.reason}"


@dataclass
class RawChunk:
    """Consecutive rows of a log: every column as strings (null = empty cell)."""

    table: pa.Table
    line: np.ndarray  # int64 line (CSV) / row (Parquet) number of each row
    invalid: list[BadRow]  # rows of this stretch the CSV parser rejected (wrong number of cells)


HEADERLESS_PREFIX = "column_"  # the names of a headerless CSV's columns: column_1, column_2, ...

# Cells that mean "no value": pyarrow's defaults (NULL, NA, N/A, NaN, null, ...) and MySQL's and
# Hive's \N, as their exports write a NULL.
NULL_CELLS = [*pa_csv.ConvertOptions().null_values, "\\N"]


def column_names(path: str | Path) -> list[str]:
    """The log's column names, from its header or Parquet schema, without reading the rows; a CSV
    whose first line is data (:func:`csv_has_header`) has ``column_1``, ``column_2``, ..."""
    if is_parquet(path):
        try:
            schema = _parquet_dataset(path).schema if Path(path).is_dir() else pq.ParquetFile(path).schema_arrow
            return _flat_struct(schema.empty_table()).column_names
        except (OSError, pa.ArrowException) as exc:
            raise SchemaError(f"{path}: cannot read the Parquet schema: {exc}") from None
    if is_directory_log(path):
        return column_names(_directory_files(path)[0])
    if is_json_lines(path):
        try:
            return json_lines_columns(path)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise SchemaError(f"{path}: {exc}") from None
    header = _first_row(path)
    if is_data_row(path, header):
        return [f"{HEADERLESS_PREFIX}{i + 1}" for i in range(len(header))]
    if len(set(header)) != len(header):
        raise SchemaError(f"{path}: duplicate column names in the header {header}")
    return header


def _first_row(path: str | Path) -> list[str]:
    try:
        with pa.input_stream(str(path), compression="detect") as raw:
            text = io.TextIOWrapper(raw, encoding=text_encoding(path), newline="")
            delimiter = csv_delimiter(path)
            lines = (line.replace("::", DOUBLE_COLON) for line in text) if delimiter == DOUBLE_COLON else text
            row = next(csv.reader(lines, delimiter=delimiter), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SchemaError(f"{path}: cannot read the header: {exc}") from None
    if not row:
        raise SchemaError(f"{path}: the file is empty (no header line)")
    return row


def csv_has_header(path: str | Path) -> bool:
    """Whether a CSV's first line names its columns (:func:`streams.log_formats.is_data_row`)."""
    return not is_data_row(path, _first_row(path))


def check_columns(path: str | Path, schema: LogSchema, header: list[str] | None = None) -> list[str]:
    """The log's header (or ``header``: the columns it is read with, an item table's joined),
    after checking it has the reserved columns and the schema's columns."""
    header = column_names(path) if header is None else header
    roles = {"user": schema.user_col, "item": schema.item_col, "label": schema.label_col, "time": schema.time_col}
    missing = [c for c in roles.values() if c and c not in header]
    if missing:
        hint = "; name the column with " + ", ".join(f"--{r}-col" for r, c in roles.items() if c in missing)
        if header and all(c.startswith(HEADERLESS_PREFIX) for c in header):
            hint = ("; its first line is data, not a header: name the columns with --user-col "
                    f"{HEADERLESS_PREFIX}1 ... (or add a header line)")
        elif len(header) == 1 and re.fullmatch(r"\d+:", header[0].strip()):
            hint = ("; a first line 'ID:' is the Netflix Prize's block format (each 'movie_id:' line "
                    "heads its 'customer_id,rating,date' rows): write one row per rating, with "
                    "the movie id in a column")
        raise SchemaError(f"{path}: missing columns {missing} (the log has {header}){hint}")
    absent = [c.name for c in schema.columns if c.name not in header]
    if absent:
        raise SchemaError(f"{path}: the schema describes columns the log does not have: {absent}")
    return header


def read_chunks(path: str | Path, chunk_rows: int = 65536) -> Iterator[RawChunk]:
    """The log's rows in file order, about ``chunk_rows`` at a time (CSV splits by bytes)."""
    if is_directory_log(path):
        yield from _directory_chunks(path, chunk_rows)
    elif is_parquet(path):
        yield from _parquet_chunks(path, chunk_rows)
    elif is_json_lines(path):
        yield from _json_lines_chunks(path, chunk_rows)
    else:
        yield from _csv_chunks(path, chunk_rows)


def _directory_files(directory: str | Path) -> list[Path]:
    files = data_files(directory)
    if not files:
        raise SchemaError(f"{directory} is an empty directory: a log is a file, or a directory of CSV, "
                          "JSON Lines or Parquet files (an export in parts)")
    kinds = {"json lines" if is_json_lines(f) else "csv" for f in files}
    if len(kinds) > 1 or any(is_parquet(f) for f in files):
        raise SchemaError(f"{directory} mixes formats ({', '.join(sorted({f.suffix for f in files}))}): "
                          "a directory log is files of one format")
    return files


def _directory_chunks(directory: str | Path, chunk_rows: int) -> Iterator[RawChunk]:
    """A directory's CSV or JSON Lines files as one log, in path order, each with the first
    file's columns; lines are numbered as if the files were concatenated (each bad row's
    reason names its own file and line)."""
    files = _directory_files(directory)
    names = column_names(files[0])
    offset = 0
    for f in files:
        if column_names(f) != names:
            raise SchemaError(f"{f}: columns {column_names(f)} differ from {files[0].name}'s {names}")
        last = 0
        for chunk in read_chunks(f, chunk_rows):
            last = max([last, *chunk.line[-1:].tolist(), *(b.line for b in chunk.invalid)])
            bad = [BadRow(b.line + offset, b.column, f"{b.reason} ({f.name}, line {b.line})", b.raw)
                   for b in chunk.invalid]
            yield RawChunk(chunk.table, chunk.line + offset, bad)
        offset += last


def _json_lines_chunks(path: str | Path, chunk_rows: int) -> Iterator[RawChunk]:
    names = column_names(path)
    try:
        for table, lines, bad in json_lines_chunks(path, names, chunk_rows, rows_key(path)):
            yield RawChunk(table, np.asarray(lines, np.int64),
                           [BadRow(n, "(line)", why, text) for n, why, text in bad])
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{path}: {exc}") from None


def _csv_chunks(path: str | Path, chunk_rows: int) -> Iterator[RawChunk]:
    names = column_names(path)
    invalid: list[BadRow] = []

    def on_invalid(row) -> str:
        # Called while a block is parsed, before its batch is yielded (use_threads=False).
        if row.actual_columns < row.expected_columns:
            column = names[row.actual_columns]
            why = f"{row.actual_columns} cells, the header has {row.expected_columns} (no {column!r})"
        else:
            column = f"#{row.expected_columns + 1}"
            why = f"{row.actual_columns} cells, the header has {row.expected_columns}"
        invalid.append(BadRow(int(row.number or 0), column, why, row.text))
        return "skip"

    first = 2 if csv_has_header(path) else 1  # the line of the first record
    try:
        reader = pa_csv.open_csv(
            csv_source(path),
            read_options=pa_csv.ReadOptions(use_threads=False, block_size=csv_block_size(path, chunk_rows),
                                            encoding=csv_encoding(path),
                                            column_names=None if first == 2 else names),
            parse_options=pa_csv.ParseOptions(delimiter=csv_delimiter(path), newlines_in_values=True,
                                              invalid_row_handler=on_invalid),
            convert_options=pa_csv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                  strings_can_be_null=True, null_values=NULL_CELLS))
    except (OSError, pa.ArrowInvalid) as exc:
        raise SchemaError(f"{path}: {exc}") from None
    good = 0  # good rows before this chunk
    skipped: list[int] = []  # good rows before each rejected line, sorted (see below)
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowInvalid as exc:
            raise SchemaError(f"{path}: {exc}") from None
        # Record k (0-based, good rows only) sits at line k + first + (rejected lines before it).
        # A rejected line at L had L - first - i good rows before it (i: rejected lines before it).
        for bad in invalid:
            skipped.append(bad.line - first - len(skipped))
        chunk_invalid, invalid[:] = list(invalid), []
        k = np.arange(good, good + batch.num_rows, dtype=np.int64)
        lines = k + first + np.searchsorted(np.asarray(skipped, np.int64), k, side="right")
        good += batch.num_rows
        yield RawChunk(pa.Table.from_batches([batch]), lines, chunk_invalid)
    if invalid:  # rejected rows after the last good one
        yield RawChunk(pa.Table.from_batches([], reader.schema), np.zeros(0, np.int64), list(invalid))


def _parquet_dataset(directory: str | Path) -> pads.Dataset:
    """A directory's Parquet files as one dataset, in path order, with Hive partition columns
    (``dt=2024-01-01/``) as columns of their own."""
    return pads.dataset([str(p) for p in parquet_parts(directory)], format="parquet",
                        partitioning="hive", partition_base_dir=str(directory))


def _parquet_chunks(path: str | Path, chunk_rows: int) -> Iterator[RawChunk]:
    first = 1  # a directory's rows are numbered across its files, in path order
    try:
        batches = (_parquet_dataset(path).to_batches(batch_size=chunk_rows, use_threads=False)
                   if Path(path).is_dir() else pq.ParquetFile(path).iter_batches(batch_size=chunk_rows))
    except (OSError, pa.ArrowException) as exc:
        raise SchemaError(f"{path}: {exc}") from None
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (OSError, pa.ArrowException) as exc:
            raise SchemaError(f"{path}, row {first}: {exc}") from None
        table = _flat_struct(pa.Table.from_batches([batch]))
        cols = [_as_string_column(table.column(i)) for i in range(table.num_columns)]
        lines = np.arange(first, first + table.num_rows, dtype=np.int64)
        first += table.num_rows
        yield RawChunk(pa.table(cols, names=table.column_names), lines, [])


def _flat_struct(table: pa.Table) -> pa.Table:
    """Struct columns as columns of their fields (``properties.product_id``), to the depth JSON
    Lines objects are flattened to; deeper, one JSON value."""
    for _ in range(NEST_DEPTH - 1):
        if not any(pa.types.is_struct(f.type) for f in table.schema):
            break
        table = table.flatten()
    return table


def _as_string_column(col: pa.ChunkedArray) -> pa.ChunkedArray:
    t = col.type
    if pa.types.is_string(t):
        return col
    if pa.types.is_dictionary(t):
        return _as_string_column(col.cast(t.value_type))
    if pa.types.is_boolean(t):
        return col.cast(pa.int8()).cast(pa.string())
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = pa.list_(pa.string())
        return pc.binary_join(col.cast(inner), "|")
    if pa.types.is_large_string(t):
        return col.cast(pa.string())
    if pa.types.is_struct(t) or pa.types.is_map(t):  # one value, as JSON Lines reads an object
        values = [dict(v) if isinstance(v, list) else v for v in col.to_pylist()]
        return pa.chunked_array([pa.array([cell_string(v) for v in values], pa.string())])
    try:
        return col.cast(pa.string())  # numbers, timestamps (ISO-8601), dates
    except pa.ArrowNotImplementedError:  # anything else (durations, binary...): its text
        return pa.chunked_array([pa.array([cell_string(v) for v in col.to_pylist()], pa.string())])


@dataclass
class CoreColumns:
    """The reserved columns of one chunk, parsed; rows found bad hold placeholder values."""

    user_id: np.ndarray  # int64
    item_id: np.ndarray  # int64
    label: np.ndarray  # float32 0/1
    ts_ms: np.ndarray  # int64
    truth_p: np.ndarray  # float32, NaN when absent or empty


class RowChecks:
    """Collects per-column failures of a chunk; each row keeps only its first failure."""

    def __init__(self, chunk: RawChunk) -> None:
        self.chunk = chunk
        self.bad = np.zeros(chunk.table.num_rows, bool)  # left out: bad or skipped
        self.found: list[tuple[int, str, str]] = []
        self.skipped = 0  # rows left out by the schema's rule, not bad (no user or item)

    def skip(self, mask: np.ndarray) -> None:
        new = mask & ~self.bad
        self.bad |= new
        self.skipped += int(new.sum())

    def add(self, mask: np.ndarray, column: str, reason: str | Callable[[int], str]) -> None:
        new = np.flatnonzero(mask & ~self.bad)
        self.bad[new] = True
        for i in new.tolist():
            self.found.append((i, column, reason(i) if callable(reason) else reason))

    def rows(self) -> list[BadRow]:
        t = self.chunk.table
        out = []
        for i, column, reason in sorted(self.found):
            cells = ["" if v is None else str(v) for v in t.slice(i, 1).to_pylist()[0].values()]
            text = io.StringIO()
            csv.writer(text, lineterminator="").writerow(cells)
            out.append(BadRow(int(self.chunk.line[i]), column, reason, text.getvalue()))
        return out


def parse_core(chunk: RawChunk, schema: LogSchema, checks: RowChecks) -> CoreColumns:
    """Parses user, item, label, time and truth of a chunk, recording bad cells in ``checks``."""
    t = chunk.table
    n = t.num_rows
    cols = {}
    for name in (schema.user_col, schema.item_col):
        arr = one_chunk(t.column(name))
        empty = pc.equal(pc.fill_null(arr, ""), "").to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
        if schema.skip_empty_ids:  # a guest's purchase, a page view: not about a user and an item
            checks.skip(empty)
        else:
            checks.add(empty, name, "empty id")
        cols[name] = entity_ids(name, arr)
    if schema.implicit:  # interactions only: every row is a positive
        label = np.ones(n, np.float32)
    else:
        label, bad_label = parse_labels(t.column(schema.label_col), schema.positive_threshold,
                                        schema.positive_values)
        lab_text = t.column(schema.label_col)
        want = ("an event type" if schema.positive_values else
                "0 or 1 (a score or a rating? set positive_threshold)" if schema.positive_threshold is None
                else "a number")
        checks.add(bad_label, schema.label_col, lambda i: f"label {lab_text[i].as_py() or ''!r} is not {want}")
    if not schema.time_col:  # no time column: the file's order
        ts = FILE_ORDER_EPOCH_MS + chunk.line.astype(np.int64) * 1000
    else:
        ts, empty_ts, bad_ts = parse_times(t.column(schema.time_col), schema.time_format)
        time_text = t.column(schema.time_col)
        want = f"as {schema.time_format!r}" if schema.time_format else "(epoch s, epoch ms or ISO-8601)"
        checks.add(empty_ts, schema.time_col, "empty time")
        checks.add(bad_ts, schema.time_col, lambda i: f"time {time_text[i].as_py()!r} does not parse {want}")
        checks.add(ts < 0, schema.time_col, "time before 1970")
    truth = np.full(n, np.nan, np.float32)
    if schema.truth_col in t.column_names:
        p, bad_p = parse_floats(t.column(schema.truth_col))
        with np.errstate(invalid="ignore"):
            bad_p |= (p < 0) | (p > 1) | np.isinf(p)
        checks.add(bad_p, schema.truth_col, "truth_p is not a probability in [0, 1]")
        truth = p.astype(np.float32)
    return CoreColumns(cols[schema.user_col], cols[schema.item_col], label, ts, truth)

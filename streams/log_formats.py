"""Which format a log file is in (by its name, compression suffixes aside), and how a CSV one is
laid out: its text encoding, its delimiter and a block size for about n rows.
:mod:`streams.log_source` reads it."""

from __future__ import annotations

import codecs
import csv
import io
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa

from streams.log_cells import NUMBER

__all__ = ["DOUBLE_COLON", "csv_block_size", "csv_delimiter", "csv_source", "csv_encoding", "data_files", "is_data_row", "is_directory_log",
           "is_json_lines", "is_parquet", "parquet_parts", "source_name", "text_encoding"]

log = logging.getLogger(__name__)
_ENCODING_SAMPLE = 1 << 20

_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")


def _plain_name(path: str | Path) -> str:
    """The file name, lower case, without a compression suffix."""
    name = Path(path).name.lower()
    for c in _COMPRESSED:
        name = name.removesuffix(c)
    return name


def is_parquet(path: str | Path) -> bool:
    """A ``.parquet``/``.pq`` file, or a directory of them (:func:`parquet_parts`)."""
    if Path(path).is_dir():
        return bool(parquet_parts(path))
    return _plain_name(path).endswith((".parquet", ".pq"))


def parquet_parts(directory: str | Path) -> list[Path]:
    """The Parquet files under ``directory``, at any depth, in path order: a Spark, Hive or
    BigQuery export (``dt=2024-01-01/part-00000.parquet``); hidden and ``_`` files
    (``_SUCCESS``, ``.crc``) are not data."""
    return [p for p in data_files(directory) if _plain_name(p).endswith((".parquet", ".pq"))]


def data_files(directory: str | Path) -> list[Path]:
    """The files under ``directory``, at any depth, in path order, but hidden and ``_`` ones."""
    root = Path(directory)
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts))


def is_json_lines(path: str | Path) -> bool:
    return _plain_name(path).endswith((".jsonl", ".ndjson", ".json"))


def is_directory_log(path: str | Path) -> bool:
    """A directory of CSV or JSON Lines files (one log, the files in path order); a directory of
    Parquet files is read by pyarrow's dataset instead (:func:`is_parquet`)."""
    return Path(path).is_dir() and not is_parquet(path)


def csv_encoding(path: str | Path) -> str:
    """``utf-8``, unless the first MiB is not UTF-8: then the Western legacy encoding that
    decodes it (``cp1252``, else ``latin-1``, which decodes any byte), as older exports and
    spreadsheets write them (Book-Crossing's ``BX-Book-Ratings.csv``), with a warning."""
    return _encoding(str(Path(path).resolve()), Path(path).stat().st_mtime_ns)


@lru_cache(maxsize=64)
def _encoding(path: str, mtime_ns: int) -> str:  # noqa: ARG001 - mtime: a rewritten file is read again
    try:
        with pa.input_stream(path, compression="detect") as raw:
            sample = raw.read(_ENCODING_SAMPLE)
    except OSError:
        return "utf-8"  # column_names reports it
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)  # a cut last character is fine
        return "utf-8"
    except UnicodeDecodeError as exc:
        where = exc.start
    for encoding in ("cp1252", "latin-1"):
        try:
            sample.decode(encoding)
        except UnicodeDecodeError:
            continue
        log.warning("%s is not UTF-8 (byte 0x%02x at offset %d): read as %s", path, sample[where], where, encoding)
        return encoding
    return "latin-1"  # not reached: latin-1 decodes every byte


DOUBLE_COLON = "\x1f"  # the delimiter "::" is read as (ASCII's unit separator)


class _DoubleColons(io.RawIOBase):
    """A binary stream with each ``::`` read as :data:`DOUBLE_COLON` (one byte: pyarrow's and
    Python's CSV readers take one-character delimiters)."""

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self.raw, self.held, self.out = raw, b"", b""  # held: a lone colon; out: read, not returned

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        whole = size is None or size < 0
        while whole or len(self.out) < size:
            raw = self.raw.read() if whole else self.raw.read(max(size, 1 << 16))
            if not raw:
                self.out, self.held = self.out + self.held, b""
                break
            data, self.held = (self.held + raw).replace(b"::", DOUBLE_COLON.encode()), b""
            if data.endswith(b":"):  # a lone colon: its pair may come with the next read
                data, self.held = data[:-1], b":"
            self.out += data
        cut = len(self.out) if whole else size
        data, self.out = self.out[:cut], self.out[cut:]
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.raw.close()
        super().close()


def csv_source(path: str | Path) -> Any:
    """What a CSV reader opens: the path, or for a ``::`` file a stream of it with one delimiter byte."""
    if csv_delimiter(path) != DOUBLE_COLON:
        return str(path)
    return _DoubleColons(pa.input_stream(str(path), compression="detect"))


def csv_delimiter(path: str | Path) -> str:
    """A tab for ``.tsv``/``.tab`` (compressed too); else what the first lines show (comma, tab
    or semicolon; a pipe where it alone splits every line alike, as MovieLens 100K's ``u.item``
    and ``u.user``; :data:`DOUBLE_COLON` for MovieLens 1M's ``::``, which :func:`csv_source`
    reads as one byte, so a title's own colon stays in its cell; a comma when they show nothing)."""
    if _plain_name(path).endswith((".tsv", ".tab")):
        return "\t"
    try:
        with pa.input_stream(str(path), compression="detect") as raw:
            sample = io.TextIOWrapper(raw, encoding=text_encoding(path), newline="").read(1 << 14)
    except (OSError, UnicodeDecodeError):
        return ","  # column_names reports it
    lines = sample.splitlines()[:20]
    if len(lines) > 1 and len(sample) == 1 << 14:
        lines = lines[:-1]  # the last may be cut
    if lines and all("::" in line for line in lines):
        return DOUBLE_COLON  # MovieLens 1M/10M's "::" between every two cells
    alike = [d for d in ",\t;|" if lines and len({line.count(d) for line in lines}) == 1 and lines[0].count(d)]
    if alike == ["|"]:
        return "|"
    try:
        return csv.Sniffer().sniff("\n".join(lines), delimiters=",\t;").delimiter
    except csv.Error:
        pass
    return ","


def csv_block_size(path: str | Path, chunk_rows: int) -> int:
    """Bytes per CSV block so a block holds about ``chunk_rows`` rows (from the first 64 KiB)."""
    with pa.input_stream(str(path), compression="detect") as raw:
        sample = raw.read(1 << 16)
    per_row = max(8, len(sample) // max(1, sample.count(b"\n")))
    return int(min(max(per_row * chunk_rows, 1 << 16), 1 << 30))


def source_name(path: str | Path) -> str:
    """The file name without its log suffixes (``logs/may.csv.gz`` -> ``may``): request ids'
    prefix, so replaying the same file gives the same ids wherever it lies."""
    name = Path(path).name
    for suffix in (".gz", ".bz2", ".zst", ".csv", ".tsv", ".tab", ".jsonl", ".ndjson", ".json",
                   ".parquet", ".pq"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


def text_encoding(path: str | Path) -> str:
    """:func:`csv_encoding` as Python's text reader takes it (a UTF-8 byte-order mark skipped)."""
    encoding = csv_encoding(path)
    return "utf-8-sig" if encoding == "utf-8" else encoding


_NUMBER_CELL = re.compile(NUMBER)
_HASH_CELL = re.compile(r"(?=.*\d)[0-9a-f]{8,}")  # a hashed value; no column's name
# A header cell is never a date: 2019-11-24T10:00, 11/9/2019 12:00 AM, 01-Jan-1995, Mar 22, 2003.
_DATE_CELL = re.compile(r"(\d{4}[-/]\d{2}[-/]\d{2}|\d{1,2}[/.]\d{1,2}[/.]\d{2}(\d{2})?)([ T].*)?"
                        r"|\d{1,2}-[A-Z][a-z]{2}-\d{4}|[A-Z][a-z]{2} \d{1,2}, \d{4}")


def is_data_row(path: str | Path, row: list[str]) -> bool:
    """Whether a CSV's first line is a row, not a header: half of its cells numbers or hashes
    (MovieLens' ``u.data``, Taobao's ``UserBehavior.csv``, Criteo's ``68fd1e64``), one a date
    (``alice,hat,1,2019-11-24T10:00:00Z``), or, in a ``::`` file (MovieLens 1M's, which have no
    header), a number first (``movies.dat``'s ``1::Toy Story (1995)::...``)."""
    cells = [c.strip() for c in row]
    if any(_DATE_CELL.fullmatch(c) for c in cells):
        return True
    if cells and _NUMBER_CELL.fullmatch(cells[0]) and csv_delimiter(path) == DOUBLE_COLON:
        return True
    return 2 * sum(bool(_NUMBER_CELL.fullmatch(c) or _HASH_CELL.fullmatch(c)) for c in cells) >= len(cells)

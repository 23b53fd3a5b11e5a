"""Which format a log file is in (by its name, compression suffixes aside), and how a CSV one is
laid out: its delimiter and a block size for about n rows. :mod:`streams.log_source` reads it."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pyarrow as pa

__all__ = ["csv_block_size", "csv_delimiter", "is_json_lines", "is_parquet", "source_name"]

_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")


def _plain_name(path: str | Path) -> str:
    """The file name, lower case, without a compression suffix."""
    name = Path(path).name.lower()
    for c in _COMPRESSED:
        name = name.removesuffix(c)
    return name


def is_parquet(path: str | Path) -> bool:
    return _plain_name(path).endswith((".parquet", ".pq"))


def is_json_lines(path: str | Path) -> bool:
    return _plain_name(path).endswith((".jsonl", ".ndjson", ".json"))


def csv_delimiter(path: str | Path) -> str:
    """A tab for ``.tsv``/``.tab`` (compressed too); else what the first lines show (comma, tab
    or semicolon; a comma when they show nothing)."""
    if _plain_name(path).endswith((".tsv", ".tab")):
        return "\t"
    try:
        with pa.input_stream(str(path), compression="detect") as raw:
            sample = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="").read(1 << 14)
    except (OSError, UnicodeDecodeError):
        return ","  # column_names reports it
    lines = sample.splitlines()[:20]
    if len(lines) > 1 and len(sample) == 1 << 14:
        lines = lines[:-1]  # the last may be cut
    try:
        return csv.Sniffer().sniff("\n".join(lines), delimiters=",\t;").delimiter
    except csv.Error:
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

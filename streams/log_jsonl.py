"""JSON Lines logs (``.jsonl``, ``.ndjson``, ``.json``; compressed too): one object per line,
read into the same string columns as a CSV (:mod:`streams.log_source`).

Why not ``pyarrow.json``: it fixes each field's type from the first block and stops the whole
read at the first line that disagrees (an ``item_id`` that is a number in one event and a string
in the next, as event logs have), and it cannot set one malformed line aside. Here each line is
decoded on its own: a line that is not a JSON object is a bad row (dead-lettered or raised like
a CSV row), and every value becomes the string a CSV cell would hold: ``null`` and ``""`` an
empty cell, ``true``/``false`` ``1``/``0`` (Parquet booleans read the same), lists joined with
``|`` (a multi-valued cell).

Nested objects are flattened, as ``pandas.json_normalize`` does, into columns named by their
path (a Segment event's ``properties.product_id``), to :data:`NEST_DEPTH` levels (deeper: compact
JSON, one categorical value). A top-level list of objects is the log's rows (OTTO's session
``{"session": 12, "events": [{"aid": 5, "ts": ..., "type": "clicks"}, ...]}``): each object is a
row, its keys ``events.aid``, ... beside the line's other cells, on the line's number.

Columns are the keys of the first ``sample_lines`` lines, in order of first appearance; a key
seen only later is not a column (it is counted and logged once per read).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

log = logging.getLogger(__name__)

__all__ = ["cell_string", "json_lines_columns", "json_lines_chunks", "rows_key"]

NEST_DEPTH = 3  # levels of nested objects flattened into columns (properties.product_id)


def _lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line."""
    with pa.input_stream(str(path), compression="detect") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        for number, line in enumerate(text, 1):
            if line.strip():
                yield number, line


def _object(line: str) -> dict[str, Any]:
    """The line's object; ``ValueError`` with the reason when it is not one."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"a JSON {type(obj).__name__}, not an object (one object per line)")
    return obj


def _flat(obj: dict[str, Any], prefix: str = "", depth: int = 1) -> dict[str, Any]:
    """``obj`` with its nested objects' keys as ``a.b`` paths, to :data:`NEST_DEPTH` levels."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict) and depth < NEST_DEPTH:  # {}: its keys' cells are empty
            out.update(_flat(value, f"{prefix}{key}.", depth + 1))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _is_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _rows(obj: dict[str, Any], key: str | None) -> list[dict[str, Any]]:
    """The flat rows of one line: one, or one per object of its ``key`` list."""
    if key is None or not _is_rows(obj.get(key)):
        return [_flat(obj)]
    parent = _flat({k: v for k, v in obj.items() if k != key})
    return [{**parent, **_flat(element, f"{key}.")} for element in obj[key]]


def rows_key(path: str | Path, sample_lines: int = 10_000) -> str | None:
    """The top-level key whose value is a list of objects on most sampled lines that have it: the
    log's rows (OTTO's ``events``); None when there is none."""
    lists: dict[str, int] = {}
    present: dict[str, int] = {}
    for i, (_, line) in enumerate(_lines(path)):
        if i >= sample_lines:
            break
        try:
            obj = _object(line)
        except ValueError:
            continue
        for key, value in obj.items():
            present[key] = present.get(key, 0) + 1
            lists[key] = lists.get(key, 0) + _is_rows(value)
    return next((k for k, n in lists.items() if n and 2 * n >= present[k]), None)


def json_lines_columns(path: str | Path, sample_lines: int = 10_000) -> list[str]:
    """The (flattened) keys of the first ``sample_lines`` objects, in order of first appearance.
    ``ValueError`` for a file that is one JSON array or has no object in its sample."""
    seen: dict[str, None] = {}
    first_error = ""
    key = rows_key(path, sample_lines)
    for i, (_, line) in enumerate(_lines(path)):
        if i == 0 and line.lstrip().startswith("["):
            raise ValueError("a JSON array, not JSON Lines: write one object per line")
        if i >= sample_lines:
            break
        try:
            for row in _rows(_object(line), key):
                seen.update(dict.fromkeys(row))
        except ValueError as exc:
            first_error = first_error or f"line {i + 1}: {exc}"
            continue  # a bad line is reported when the rows are read
    if not seen:
        hint = ("; its lines look like Python dicts (single quotes), which JSON is not: write them "
                "with json.dumps" if first_error and line.lstrip().startswith("{'") else "")
        raise ValueError(f"no JSON object in its first lines ({first_error or 'no lines'}){hint}")
    return list(seen)


def cell_string(v: Any) -> str | None:
    """The CSV cell a decoded JSON (or Parquet) value stands for (see the module docstring)."""
    if v is None:
        return None
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, str):
        return v or None  # an empty string is an empty cell, as in a CSV
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "|".join(c for c in map(cell_string, v) if c is not None)
    return json.dumps(v, separators=(",", ":"), sort_keys=True, default=str)


def json_lines_chunks(path: str | Path, names: list[str], chunk_rows: int, key: str | None = None
                      ) -> Iterator[tuple[pa.Table, list[int], list[tuple[int, str, str]]]]:
    """Per about ``chunk_rows`` rows: (string columns ``names``, each row's line number, the
    bad lines as (line, reason, text)); a line's ``key`` list of objects is its rows."""
    want = set(names)
    unknown: dict[str, int] = {}
    cols: dict[str, list[str | None]] = {n: [] for n in names}
    numbers: list[int] = []
    bad: list[tuple[int, str, str]] = []

    def flush():
        table = pa.table({n: pa.array(cols[n], pa.string()) for n in names})
        out = (table, list(numbers), list(bad))
        for c in cols.values():
            c.clear()
        numbers.clear()
        bad.clear()
        return out

    for number, line in _lines(path):
        try:
            obj = _object(line)
        except ValueError as exc:
            bad.append((number, str(exc), line.rstrip("\r\n")))
            continue
        for row in _rows(obj, key):
            for k in row.keys() - want:
                unknown[k] = unknown.get(k, 0) + 1
            for n in names:
                cols[n].append(cell_string(row.get(n)))
            numbers.append(number)
        if len(numbers) >= chunk_rows:
            yield flush()
    if numbers or bad:
        yield flush()
    if unknown:
        log.warning("%s: keys absent from the first lines are not columns, and were left out: %s",
                    path, ", ".join(f"{k} ({n} rows)" for k, n in sorted(unknown.items())))

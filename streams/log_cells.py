"""Parses a log's cells: numbers, event times and labels, a whole column at a time.

Each parser takes one column of strings (null = empty cell) and returns its values with masks
of the cells that are empty or do not parse, so a caller can set bad rows aside (dead-letter
them, or name the first) without a Python loop over the good ones.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_EPOCH_S_BELOW = 1e11  # a numeric time below this is epoch seconds, else epoch milliseconds


def one_chunk(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        return arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    return arr


def _bisect(arr: pa.Array, convert: Callable[[pa.Array], np.ndarray], fill: float,
            out: np.ndarray, bad: np.ndarray, offset: int = 0) -> None:
    """Converts ``arr`` into ``out[offset:]``; cells that fail alone are marked in ``bad``.

    One vectorised call for a clean column; a bad cell costs a few calls on halves around it.
    """
    try:
        out[offset:offset + len(arr)] = convert(arr)
        return
    except (pa.ArrowInvalid, ValueError, OverflowError):
        if len(arr) == 1:
            out[offset], bad[offset] = fill, True
            return
    half = len(arr) // 2
    _bisect(arr.slice(0, half), convert, fill, out, bad, offset)
    _bisect(arr.slice(half), convert, fill, out, bad, offset + half)


# What Arrow's string -> double cast accepts; a cell that fails it is never cast alone.
NUMBER = r"^[+-]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][+-]?[0-9]+)?$|^[+-]?(?i:nan|inf|infinity)$"


def _to_float(a: pa.Array) -> np.ndarray:
    return pc.cast(a, pa.float64()).to_numpy(zero_copy_only=False)


def parse_floats(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, NaN where empty; bool mask of cells that are not numbers)."""
    arr = one_chunk(arr)
    out = np.full(len(arr), np.nan)
    bad = np.zeros(len(arr), bool)
    if not len(arr):
        return out, bad
    try:
        return _to_float(arr), bad  # the common case: one call
    except (pa.ArrowInvalid, ValueError):
        pass
    looks = pc.fill_null(pc.match_substring_regex(arr, NUMBER), True).to_numpy(zero_copy_only=False)
    bad[~looks] = True
    where = np.flatnonzero(looks)
    if len(where):
        sub_out, sub_bad = np.full(len(where), np.nan), np.zeros(len(where), bool)
        _bisect(arr.take(pa.array(where)), _to_float, np.nan, sub_out, sub_bad)
        out[where], bad[where] = sub_out, sub_bad
    return out, bad


def parse_times(arr: pa.Array, time_format: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int64 ms since the epoch; mask of empty cells; mask of cells that do not parse).

    With no ``time_format``, a number is epoch seconds below 1e11, else epoch milliseconds;
    anything else must be ISO-8601 (``2019-11-24 00:00:34.762830+00:00``, ``2019-11-24T00:00:34Z``,
    ``2019-11-24``, or year first with slashes, ``2019/11/24 00:00:34``); a time without a zone is
    UTC, and so is one ending in `` UTC`` or `` GMT`` (``2019-11-24 00:00:34 UTC``, as BigQuery
    exports it). A ``time_format`` is strptime's (``%m/%d/%Y %I:%M:%S %p``), its times UTC.
    """
    arr = one_chunk(arr)
    n = len(arr)
    empty = arr.is_null().to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
    if time_format:
        cells = pc.utf8_trim_whitespace(arr)
        if time_format == MONTH_DAY:  # no year: 2000's (a leap year, so 0229 reads); 829 is 0829
            cells, time_format = pc.binary_join_element_wise("2000", pc.utf8_lpad(cells, 4, "0"), ""), "%Y%m%d"
        parsed = pc.strptime(cells, format=time_format, unit="ms", error_is_null=True)
        ok = parsed.is_valid().to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
        ms = pc.fill_null(parsed.cast(pa.int64()), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        return ms, empty, ~empty & ~ok
    values, not_number = parse_floats(arr)
    ms = np.zeros(n, np.int64)
    num = ~empty & ~not_number & np.isfinite(values)
    with np.errstate(invalid="ignore"):
        ms[num] = np.round(np.where(values[num] < _EPOCH_S_BELOW, values[num] * 1000, values[num]))
    bad = ~empty & ~num
    iso = np.flatnonzero(bad & not_number)
    if len(iso):  # year first with slashes (2019/11/24 00:00:34) is ISO's date with other marks
        arr = pc.replace_substring_regex(arr, r"^\s*([0-9]{4})/([0-9]{2})/([0-9]{2})", r"\1-\2-\3")
        arr = pc.replace_substring_regex(arr, r"\s*(?i:UTC|GMT)\s*$", "+00:00")  # BigQuery's exports
        sub = arr.take(pa.array(iso))
        zoned = pc.match_substring_regex(sub, r"(Z|[+-][0-9]{2}:?[0-9]{2})$").to_numpy(zero_copy_only=False)
        # Parsed in ns so fractions of up to 9 digits (pandas, Parquet timestamps) are accepted.
        for mask, tp in ((zoned, pa.timestamp("ns", tz="UTC")), (~zoned, pa.timestamp("ns"))):
            where = iso[mask]
            if not len(where):
                continue
            ns = np.zeros(len(where), np.int64)
            fail = np.zeros(len(where), bool)
            _bisect(arr.take(pa.array(where)),
                    lambda a, tp=tp: pc.cast(a, tp).cast(pa.int64()).to_numpy(zero_copy_only=False),
                    0, ns, fail)
            ms[where] = ns // 1_000_000
            bad[where] = fail
    return ms, empty, bad


TRUE_CELLS = ("true", "t")  # a boolean label as exports write it (any case)
FALSE_CELLS = ("false", "f")


def parse_labels(arr: pa.Array, threshold: float | None,
                 positive_values: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(float32 0/1 labels; mask of bad cells). With ``positive_values`` (an event-type column:
    ``view``, ``addtocart``, ``transaction``) a cell among them is 1, any other 0, an empty one
    bad; with a threshold a number at or above it is 1; else a label must be 0 or 1, or a
    boolean as exports write them (``true``/``false``, ``t``/``f``: any case)."""
    arr = one_chunk(arr)
    if positive_values:
        cells = pc.utf8_trim_whitespace(arr)
        label = pc.fill_null(pc.is_in(cells, pa.array(positive_values, pa.string())), False)
        bad = pc.fill_null(pc.equal(cells, ""), True)
        return (label.to_numpy(zero_copy_only=False).astype(np.float32),
                bad.to_numpy(zero_copy_only=False).astype(bool))
    values, bad = parse_floats(arr)
    if threshold is None and bad.any():  # words, booleans among them: only then the extra passes
        word = pc.utf8_lower(pc.utf8_trim_whitespace(arr))
        arr = pc.if_else(pc.is_in(word, pa.array(TRUE_CELLS)), "1",
                         pc.if_else(pc.is_in(word, pa.array(FALSE_CELLS)), "0", arr))
        values, bad = parse_floats(arr)
    bad |= np.isnan(values) | np.isinf(values)
    if threshold is None:
        bad |= ~np.isin(values, (0.0, 1.0))
        label = (values == 1.0)
    else:
        with np.errstate(invalid="ignore"):
            label = values >= threshold
    return label.astype(np.float32), bad


# Formats :func:`time_format_of` tries on a time column that is neither epoch numbers nor ISO-8601:
# US month first (MIND's ``11/9/2019 12:00:27 AM``, UCI Online Retail's ``12/1/2009 7:45``),
# day first (``24/11/2019``, ``24.11.2019 18:30``), calendar numbers (``20220408``, Avazu's
# hour ``14102100``), and with month names (``Tue Apr 03 18:00:09 +0000 2012``, ``01-Jan-1995``).
# Month first is tried first: a column whose every day is 12 or less reads
# both ways, and US exports are the more common.
_CLOCKS = (" %I:%M:%S %p", " %I:%M %p", " %H:%M:%S", " %H:%M", "")
TIME_FORMATS = (
    *(f"%m/%d/%Y{c}" for c in _CLOCKS), *(f"%d/%m/%Y{c}" for c in _CLOCKS),
    *(f"%d.%m.%Y{c}" for c in _CLOCKS[2:]), *(f"%d-%m-%Y{c}" for c in _CLOCKS[2:]),
    *(f"%m/%d/%y{c}" for c in _CLOCKS), "%Y%m%d%H%M%S", "%Y%m%d%H%M", "%Y%m%d", "%y%m%d%H",
    "%a %b %d %H:%M:%S %z %Y", "%a, %d %b %Y %H:%M:%S %z",  # Twitter's and Foursquare's; e-mail's
    "%d-%b-%Y", "%d %b %Y", "%b %d, %Y", "%m %d, %Y",  # MovieLens' 01-Jan-1995; Amazon's "09 13, 2009"
)
MONTH_DAY = "%m%d"  # a month and day with no year (Tmall's 0829): read in 2000
SINCE_1990_MS = 631_152_000_000  # 1990-01-01 in epoch ms: a log's times are after it
FORMAT_SHARE = 0.99  # a format that parses this share of a column's non-empty cells is its format


def time_format_of(cells: pa.Array) -> str | None:
    """How a time column's cells read: ``""`` as epoch seconds or ms after 1990 or ISO-8601
    (:func:`parse_times`' default), else the first of :data:`TIME_FORMATS` that parses
    :data:`FORMAT_SHARE` of the non-empty cells, else ``""`` for numbers (times before 1990:
    still in order); None where nothing reads."""
    cells = one_chunk(cells)
    ms, empty, bad = parse_times(cells)
    if empty.all():
        return None
    parsed = ~empty & ~bad
    default = (~bad[~empty]).mean() >= FORMAT_SHARE
    if default and not (parsed.any() and (ms[parsed] < SINCE_1990_MS).all()):
        return ""
    for fmt in TIME_FORMATS:
        if (~parse_times(cells, fmt)[2][~empty]).mean() >= FORMAT_SHARE:
            return fmt
    return "" if default else None  # small numbers (Tmall's 0829): their order still holds

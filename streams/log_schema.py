"""What the columns of an interaction log mean: kinds, sides, feature ids, and the TOML form.

A log has four reserved columns (user, item, label, event time; names configurable) and an
optional known click probability (``truth_col``). A log of interactions only (purchases, plays:
no label column, ``label_col = ""``) reads every row as a positive, with ``negatives`` sampled
items per positive as its negatives (:mod:`streams.log_negatives`); ``recent_items`` adds a
user-side bag of the user's last positive items (:mod:`streams.log_history`). Every other
column is described by a :class:`ColumnSpec`: its kind (categorical, multi-valued, numeric, text, or ignored) and its
side (user-side features describe the request, item-side ones the item; serving keeps the latter
per item). A ``text`` column is no feature: it is what the LLM rerank reads about the item
(item side only; :mod:`streams.log_text`). :func:`streams.log_infer.infer_schema` guesses both from the data; a TOML schema file
overrides any part.

Feature ids are a contract, the same in every process and run (Python's ``hash`` is not):
``xxh64(slot + b"\\x1f" + value, seed=0)`` viewed as int64, see :func:`feature_ids`. User and
item columns keep canonical integer cells as their own ids so integer logs and Recommend's int64
ids stay meaningful; other cells (``007`` among them) are hashed with the column name as the slot (:func:`entity_ids`).
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from streams.log_history import RECENT_SLOT
from streams.wire import SchemaError

KINDS = ("categorical", "multi", "numeric", "text", "ignore")
SIDES = ("user", "item")
POOLINGS = ("sum", "mean")
RESERVED_SLOTS = ("user_id", "item_id")  # the joiner's own slots; no feature column may take them
MISSING_SUFFIX = ":missing"


@dataclass(frozen=True)
class ColumnSpec:
    """One feature column: ``name`` is also its sparse slot (categorical/multi) or dense name."""

    name: str
    kind: str
    side: str = "item"
    pooling: str = "sum"  # multi only: how the model pools the bag ("sum" | "mean")
    separator: str = "|"  # multi only
    decimal: str = "."  # numeric only: "," for decimal commas (European exports: 3,5)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SchemaError(f"column name must be a non-empty string, got {self.name!r}")
        for attr, allowed in (("kind", KINDS), ("side", SIDES), ("pooling", POOLINGS)):
            value = getattr(self, attr)
            if value not in allowed:
                raise SchemaError(f"column {self.name!r}: unknown {attr} {value!r} "
                                  f"(one of {', '.join(allowed)})")
        if not isinstance(self.separator, str) or not self.separator:
            raise SchemaError(f"column {self.name!r}: separator must be a non-empty string")
        if self.decimal not in (".", ","):
            raise SchemaError(f"column {self.name!r}: decimal must be \".\" or \",\", got {self.decimal!r}")
        if self.kind == "text" and self.side != "item":
            raise SchemaError(f"column {self.name!r}: a text column describes the item (side = \"item\")")


_TOP_KEYS = ("user_col", "item_col", "label_col", "time_col", "time_format", "truth_col", "impressions_col",
             "skip_empty_ids", "positive_threshold", "positive_values", "negatives", "negative_sampling",
             "recent_items", "items_file", "items_key", "users_file", "users_key")
NEGATIVE_SAMPLING = ("uniform", "popularity")
IMPLICIT_NEGATIVES = 4  # sampled negatives per row of a log without a label column
IMPLICIT_RECENT_ITEMS = 10  # ... and its recent_items (MovieLens as positives only: AUC 0.843 -> 0.868)
_COLUMN_KEYS = ("kind", "side", "pooling", "separator", "decimal")


@dataclass(frozen=True)
class LogSchema:
    """The reserved column names and one :class:`ColumnSpec` per feature column, in log order."""

    user_col: str = "user_id"
    item_col: str = "item_id"
    label_col: str = "label"
    time_col: str = "ts"  # "": none, the rows are in time order (file order)
    time_format: str = ""  # strptime's codes ("%m/%d/%Y %H:%M"); "": epoch s or ms, or ISO-8601
    truth_col: str = "truth_p"  # optional known click probability; never a feature
    impressions_col: str = ""  # a list of the items shown, read as a row each (streams.log_impressions)
    skip_empty_ids: bool = False  # a row without a user or item is skipped (counted), not a bad row
    positive_threshold: float | None = None  # None: label must be 0/1; else label = value >= it
    positive_values: tuple[str, ...] = ()  # an event-type label: these values are 1, any other 0
    negatives: int = 0  # sampled negatives added per positive row (a log of positives only)
    negative_sampling: str = "uniform"  # over the items seen before ("popularity": as often as seen)
    recent_items: int = 0  # a user-side bag of the user's last N positive items before each request
    items_file: str = ""  # an item attributes table joined onto every row (streams.log_items)
    items_key: str = ""  # its item id column ("": the log's item_col)
    users_file: str = ""  # a user attributes table joined onto every row (streams.log_items)
    users_key: str = ""  # its user id column ("": the log's user_col)
    columns: tuple[ColumnSpec, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "positive_values", tuple(self.positive_values))
        if self.positive_values and self.positive_threshold is not None:
            raise SchemaError("positive_values and positive_threshold both define the label: give one")
        if not all(isinstance(v, str) and v.strip() for v in self.positive_values):
            raise SchemaError(f"positive_values must be non-empty strings, got {list(self.positive_values)}")
        if not isinstance(self.negatives, int) or isinstance(self.negatives, bool) or self.negatives < 0:
            raise SchemaError(f"negatives must be an integer >= 0, got {self.negatives!r}")
        if self.impressions_col and self.implicit:
            raise SchemaError("an impressions column gives every listed item its label: label_col cannot be \"\"")
        if self.time_format and "%" not in self.time_format:
            raise SchemaError(f"time_format is strptime's codes (\"%m/%d/%Y %H:%M\"), got {self.time_format!r}")
        if self.negative_sampling not in NEGATIVE_SAMPLING:
            raise SchemaError(f"negative_sampling must be one of {', '.join(NEGATIVE_SAMPLING)}, "
                              f"got {self.negative_sampling!r}")
        if self.implicit and (self.negatives == 0 or self.positive_values or self.positive_threshold is not None):
            raise SchemaError('a log without a label column (label_col = "") reads every row as a positive: '
                              "it needs sampled negatives (negatives = 4) and no positive_values or "
                              "positive_threshold")
        if not isinstance(self.recent_items, int) or isinstance(self.recent_items, bool) or not 0 <= self.recent_items <= 1000:
            raise SchemaError(f"recent_items must be an integer in [0, 1000], got {self.recent_items!r}")
        if self.recent_items and any(c.name == RECENT_SLOT and c.kind not in ("ignore", "text") for c in self.columns):
            raise SchemaError(f"column {RECENT_SLOT!r}: the slot name is taken by recent_items")
        reserved = self.reserved()
        if len(set(reserved)) != len(reserved):
            raise SchemaError(f"user/item/label/time/truth columns must differ, got {reserved}")
        seen: set[str] = set()
        for c in self.columns:
            if c.name in seen:
                raise SchemaError(f"column {c.name!r} is described twice")
            if c.name in reserved:
                raise SchemaError(f"column {c.name!r} is a reserved column, not a feature")
            if c.name in RESERVED_SLOTS and c.kind not in ("ignore", "text"):
                raise SchemaError(f"column {c.name!r}: the slot name is taken by the user/item id")
            seen.add(c.name)

    def reserved(self) -> tuple[str, ...]:
        """The reserved columns' names (no label column in an implicit log; the impressions
        column, read into the item and label columns)."""
        return tuple(c for c in (self.user_col, self.item_col, self.label_col, self.time_col, self.truth_col,
                                 self.impressions_col) if c)

    @property
    def implicit(self) -> bool:
        """No label column: every row is a positive (interactions only)."""
        return not self.label_col

    def column(self, name: str) -> ColumnSpec | None:
        return next((c for c in self.columns if c.name == name), None)

    def _names(self, kinds: tuple[str, ...], side: str) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.kind in kinds and c.side == side)

    def user_slots(self) -> tuple[str, ...]:
        """Categorical and multi columns of the user side, in schema order; then ``recent_items``
        when the schema asks for it."""
        return self._names(("categorical", "multi"), "user") + ((RECENT_SLOT,) if self.recent_items else ())

    def item_slots(self) -> tuple[str, ...]:
        """Categorical and multi columns of the item side, in schema order."""
        return self._names(("categorical", "multi"), "item")

    def text_columns(self) -> tuple[str, ...]:
        """Item text columns (no features), in schema order."""
        return self._names(("text",), "item")

    def numeric_columns(self) -> tuple[str, ...]:
        """Numeric columns in dense-layout order: user side first, then item side."""
        return self._names(("numeric",), "user") + self._names(("numeric",), "item")

    def dense_names(self) -> tuple[str, ...]:
        """The dense layout (a contract): per numeric column, user side first, then item side,
        ``"<col>"`` (its online-standardised value) then ``"<col>:missing"`` (1.0 when empty)."""
        return tuple(n for c in self.numeric_columns() for n in (c, c + MISSING_SUFFIX))

    def item_dense_width(self) -> int:
        """Width of the item-side tail of the dense layout."""
        return 2 * len(self._names(("numeric",), "item"))

    # ------------------------------------------------------------------ TOML
    @classmethod
    def from_toml(cls, path: str | Path) -> "LogSchema":
        """Reads a schema file (the form :meth:`to_toml` writes); unknown keys or kinds raise."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SchemaError(f"{path}: {exc}") from None
        for k in ("items_file", "users_file"):
            if isinstance(data.get(k), str) and data[k]:  # relative to the file
                data[k] = str((Path(path).parent / data[k]).resolve())
        return cls.from_mapping(data, str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], origin: str = "schema") -> "LogSchema":
        unknown = set(data) - set(_TOP_KEYS) - {"columns"}
        if unknown:
            raise SchemaError(f"{origin}: unknown keys {sorted(unknown)} (known: {', '.join(_TOP_KEYS)}, "
                              "[columns.NAME])")
        top: dict[str, Any] = {}
        for k in _TOP_KEYS:
            if k in data:
                v = data[k]
                if k == "positive_threshold":
                    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                elif k == "positive_values":
                    ok = isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v)
                elif k == "skip_empty_ids":
                    ok = isinstance(v, bool)
                elif k in ("negatives", "recent_items"):
                    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
                elif k in ("label_col", "time_col", "time_format", "impressions_col"):
                    ok = isinstance(v, str)  # "": none (positives only; file order; the default)
                else:
                    ok = isinstance(v, str) and v
                if not ok:
                    raise SchemaError(f"{origin}: {k} has a bad value {v!r}")
                top[k] = float(v) if k == "positive_threshold" else tuple(v) if k == "positive_values" else v
        cols = data.get("columns", {})
        if not isinstance(cols, dict):
            raise SchemaError(f"{origin}: columns must be a table of [columns.NAME] tables")
        specs = []
        for name, spec in cols.items():
            if not isinstance(spec, dict):
                raise SchemaError(f"{origin}: column {name!r} must be a table (kind = ...)")
            bad = set(spec) - set(_COLUMN_KEYS)
            if bad:
                raise SchemaError(f"{origin}: column {name!r} has unknown keys {sorted(bad)}")
            if "kind" not in spec:
                raise SchemaError(f"{origin}: column {name!r} has no kind (one of {', '.join(KINDS)})")
            try:
                specs.append(ColumnSpec(name, **spec))
            except SchemaError as exc:
                raise SchemaError(f"{origin}: {exc}") from None
        return cls(**top, columns=tuple(specs))

    def to_toml(self, notes: Mapping[str, str] | None = None) -> str:
        """The schema as TOML that :meth:`from_toml` reads back.

        ``notes`` adds comment lines: under key ``""`` at the top, under a column name above
        that column's table (``--inspect`` puts the counts there).
        """
        notes = notes or {}
        out = [_comment(notes[""])] if notes.get("") else []
        for k in _TOP_KEYS:
            v = getattr(self, k)
            if k == "negatives":
                out.append(f"negatives = {v}    # sampled negatives per positive row" if v else
                           "# negatives = 4    # sampled negatives per positive row (a log of positives only)")
            elif k == "recent_items":
                out.append(f"recent_items = {v}    # a user-side bag: the user's last {v} positive items" if v else
                           "# recent_items = 10    # a user-side bag of the user's last 10 positive items before each request")
            elif k == "negative_sampling":
                if self.negatives:
                    out.append(f"negative_sampling = {_toml_value(v)}    # or \"{NEGATIVE_SAMPLING[v == 'uniform']}\"")
            elif k == "label_col" and not v:
                out.append('label_col = ""    # none: every row is a positive (interactions only)')
            elif k == "time_col" and not v:
                out.append('time_col = ""    # none: the rows are in time order (file order, 1 s apart)')
            elif k == "skip_empty_ids":
                out.append(("" if v else "# ") + "skip_empty_ids = true    # a row without a user or item "
                           "(a guest's, a page view) is skipped and counted, not a bad row")
            elif k == "time_format" and not v:
                if self.time_col:
                    out.append('# time_format = "%m/%d/%Y %H:%M"    '
                               '# strptime codes (default: epoch s or ms, or ISO-8601)')
            elif k in ("items_file", "items_key", "users_file", "users_key", "positive_values", "impressions_col"):
                if k == "positive_values" and v:
                    out.append(f"{k} = [{', '.join(_toml_value(x) for x in v)}]")
                elif v:  # written absolute: the demo's processes read the schema from elsewhere
                    out.append(f"{k} = {_toml_value(str(Path(v).resolve()) if k.endswith('_file') else v)}")
            elif v is None:
                if not self.implicit:
                    out.append(f"# {k} = 4.0    # label = value >= threshold (default: label is 0/1)")
            else:
                out.append(f"{k} = {_toml_value(v)}")
        for c in self.columns:
            out.append("")
            if notes.get(c.name):
                out.append(_comment(notes[c.name]))
            out.append(f"[columns.{_toml_key(c.name)}]")
            out.append(f"kind = {_toml_value(c.kind)}")
            out.append(f"side = {_toml_value(c.side)}")
            if c.kind == "multi":
                out.append(f"pooling = {_toml_value(c.pooling)}")
                out.append(f"separator = {_toml_value(c.separator)}")
            if c.kind == "numeric" and c.decimal != ".":
                out.append(f"decimal = {_toml_value(c.decimal)}")
        return "\n".join(out) + "\n"


def _comment(text: str) -> str:
    return "\n".join("# " + line if line else "#" for line in text.splitlines())


def _toml_value(v: Any) -> str:
    if isinstance(v, str):
        # TOML basic strings take JSON's escapes except surrogate pairs: keep non-ASCII literal.
        return re.sub(r"[\x7f]", lambda m: f"\\u{ord(m.group()):04x}", json.dumps(v, ensure_ascii=False))
    return repr(float(v)) if isinstance(v, float) else str(v)


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _toml_value(name)


# ---------------------------------------------------------------------- feature ids
def _as_strings(values: Sequence[str] | np.ndarray | pa.Array | pa.ChunkedArray) -> pa.Array:
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return pc.fill_null(arr.cast(pa.string()), "")


def _hash_unique(slot: str, uniques: list[str]) -> np.ndarray:
    prefix = slot.encode() + b"\x1f"
    h = xxhash.xxh64_intdigest
    return np.fromiter((h(prefix + v.encode(), 0) for v in uniques), np.uint64, len(uniques)).view(np.int64)


def feature_ids(slot: str, values: Sequence[str] | np.ndarray | pa.Array) -> np.ndarray:
    """int64 ids of ``values`` in ``slot``: ``xxh64(slot.encode() + b"\\x1f" + value.encode(),
    seed=0)`` viewed as int64. Each distinct value is hashed once; an empty value ("" or null)
    is the slot's "missing" id."""
    arr = _as_strings(values)
    if len(arr) == 0:
        return np.zeros(0, np.int64)
    enc = arr.dictionary_encode()
    ids = _hash_unique(slot, enc.dictionary.to_pylist())
    return ids[enc.indices.to_numpy(zero_copy_only=False)]


INT_CELL = r"^[+-]?[0-9]{1,19}$"
# An id cell kept as its own int64 id: an integer written canonically, or as a float with a zero
# fraction ("123.0": pandas writes an integer column holding an empty cell so). "007" (a
# zero-padded code) or "+7" is a string id, hashed: it must not merge with "7".
_CANONICAL_INT = r"^(0|-?[1-9][0-9]{0,18})(\.0+)?$"


def entity_ids(column: str, values: Sequence[str] | np.ndarray | pa.Array) -> np.ndarray:
    """int64 ids of user or item cells: an integer cell written canonically (no sign but ``-``,
    no leading zero; ``123.0`` too, as pandas writes integers beside an empty cell) is its own
    id, any other cell ``feature_ids(column, [cell])``. Empty cells are the caller's to reject."""
    arr = _as_strings(values)
    if len(arr) == 0:
        return np.zeros(0, np.int64)
    enc = arr.dictionary_encode()
    uniques = enc.dictionary
    ids = np.empty(len(uniques), np.int64)
    is_int = pc.match_substring_regex(uniques, _CANONICAL_INT).to_numpy(zero_copy_only=False)
    as_int = np.zeros(len(uniques), bool)
    if is_int.any():
        cells = uniques.filter(pa.array(is_int)).to_pylist()
        parsed = [int(c.partition(".")[0]) for c in cells]
        fits = np.array([-(2**63) <= v < 2**63 for v in parsed], bool)
        where = np.flatnonzero(is_int)
        ids[where[fits]] = np.array([v for v, f in zip(parsed, fits) if f], np.int64)
        as_int[where[fits]] = True
    if not as_int.all():
        rest = np.flatnonzero(~as_int)
        ids[rest] = _hash_unique(column, uniques.take(pa.array(rest)).to_pylist())
    return ids[enc.indices.to_numpy(zero_copy_only=False)]

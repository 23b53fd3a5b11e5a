"""Schema inference: one chunked pass over a log that counts what ``--inspect`` shows and guesses
each feature column's kind and side (the rules are in :func:`infer_schema`).

The reading half of :mod:`streams.log_schema`, which stays data-only and does not import this."""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streams.log_schema import IMPLICIT_NEGATIVES, IMPLICIT_RECENT_ITEMS, INT_CELL, ColumnSpec, LogSchema, feature_ids
from streams.log_stats import LABEL_VALUES, ColumnStats, LogStats
from streams.log_items import item_table, log_columns, read_log_chunks, user_table
from streams.log_leaks import LeakSample
from streams.log_impressions import guess_impressions, produced_columns
from streams.log_headerless import guess_headerless
from streams.log_names import (FirstRows, guess_table_key, guess_label_rule, guess_reserved,
                               guess_time_format)
from streams.log_cells import parse_floats
from streams.log_source import RowChecks, column_names, parse_core

log = logging.getLogger(__name__)

MULTI_SHARE = 0.02  # a column is multi-valued when this share of its non-empty cells has a "|"
# ...or has one of these (a space: between ids, each with a digit, as MIND's history
# "N123 N456"; not words), and then its values repeat between cells:
OTHER_SEPARATORS = (";", ",", " ")
LIST_TOKENS = 0.5  # this share of its values is in more than one distinct cell ("Comedy, Drama")
CODE_DISTINCT = 20  # integer columns with at most this many distinct values are codes...
CODE_SHARE = 0.05  # ...when they also repeat: at most this share of their non-empty cells
TEXT_SHARE = 0.5  # an item-side string column is text when this share of its cells has words...
TEXT_DISTINCT = 0.5  # ...and it has at least this many distinct values per distinct item
EMPTY_IDS_SHARE = 0.01  # a user or item column empty on this share of the first rows...
EMPTY_IDS_ROWS = 20  # ...and this many of them: such rows are skipped
GROUPED_RUNS = 1.05  # no time column, and at most this many runs of one user's rows per user: grouped
_NAME_KEYS = ("user_col", "item_col", "label_col", "time_col", "time_format", "truth_col", "impressions_col",
              "positive_threshold", "positive_values", "negatives", "items_file", "items_key", "users_file",
              "users_key")


class _Constancy:
    """Tracks, per column, whether its cell ever differs between two rows with the same key.

    Keys seen so far stay in one sorted array with each tracked column's first value beside it,
    so a chunk costs a sort of the chunk and a merge, never a Python loop over rows.
    """

    def __init__(self, columns: list[str]) -> None:
        self.keys = np.zeros(0, np.int64)
        self.values: dict[str, np.ndarray] = {c: np.zeros(0, np.int64) for c in columns}
        self.varies: set[str] = set()

    def update(self, keys: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
        tracked = [c for c in self.values if c not in self.varies]
        if not tracked or not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        same = sk[1:] == sk[:-1]
        first = np.concatenate(([True], ~same))
        uk = sk[first]
        pos = np.searchsorted(self.keys, uk)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == uk[found]
        for c in tracked:
            v = values[c][order]
            if (same & (v[1:] != v[:-1])).any() or (self.values[c][pos[found]] != v[first][found]).any():
                self.varies.add(c)
        new = ~found
        if new.any():
            at = pos[new]
            self.keys = np.insert(self.keys, at, uk[new])
            for c in self.values:
                self.values[c] = np.insert(self.values[c], at, values[c][order][first][new]) \
                    if c not in self.varies else self.values[c][:0]


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat()


def _names_schema(path: str | Path, overrides: LogSchema | None,
                  names: Mapping[str, Any]) -> tuple[LogSchema, list[str]]:
    """The reserved names: the schema file's, then the flags', else the usual names the header
    has (:mod:`streams.log_names`); checked against the log's header. Also the notes saying
    what was guessed."""
    given = {k: v for k, v in names.items() if v not in (None, "")}
    unknown = set(given) - set(_NAME_KEYS)
    if unknown:
        raise TypeError(f"unknown schema names {sorted(unknown)}")
    base = overrides or LogSchema()
    header = column_names(path)
    label_before = base.label_col
    base, notes = guess_impressions(path, header, replace(base, **given), given)
    produced = {role: getattr(base, role) for role in ("item_col", "label_col")
                if getattr(base, role) in produced_columns(header, base)}
    base, by_name = guess_reserved(header, base, set(given) | set(produced), FirstRows(path))
    base, by_content = guess_headerless(path, header, base, {**produced, **given})
    notes += by_name + by_content
    label_guessed = base.label_col != label_before
    if ("label_col" not in given and base.label_col == LogSchema.label_col
            and base.label_col not in header and not base.impressions_col):
        # No label column of the default name and none named: a log of interactions only.
        base = replace(base, label_col="", negatives=given.pop("negatives", None) or base.negatives
                       or IMPLICIT_NEGATIVES, recent_items=base.recent_items or IMPLICIT_RECENT_ITEMS)
        log.warning("%s has no %r column and no other label column was named (--label-col, label_col "
                    "in the schema): every row is read as a positive, with %d sampled negatives each "
                    "and the user's last %d items as a feature", path, LogSchema.label_col, base.negatives,
                    base.recent_items)
    if ("time_col" not in given and base.time_col == LogSchema.time_col
            and base.time_col not in header):
        base = replace(base, time_col="")
        log.warning("%s has no %r column and no other time column was named (--time-col, time_col in "
                    "the schema): its rows are taken to be in time order (file order)", path, LogSchema.time_col)
    base = replace(base, **given) if given else base
    for side in ("item", "user"):
        base, key_notes = guess_table_key(base, header, given, side)
        notes += key_notes
    log_columns(path, base)  # checks the reserved and described columns are there
    base, time_notes = guess_time_format(path, base)
    base, skip_notes = _guess_skip_empty_ids(path, base)
    time_notes += skip_notes
    base, label_notes = guess_label_rule(path, base, label_named="label_col" in given, label_guessed=label_guessed)
    return base, notes + time_notes + label_notes


def _guess_skip_empty_ids(path: str | Path, schema: LogSchema) -> tuple[LogSchema, list[str]]:
    """``schema`` with ``skip_empty_ids`` where the user or item column is empty on
    :data:`EMPTY_IDS_SHARE` of the first rows (guests' purchases beside signed-in ones, page
    views beside product views, a search log's actions beside its result pages): such rows are
    skipped and counted, not bad rows. Fewer stay bad rows: a stray empty id is a fault to see."""
    if schema.skip_empty_ids:
        return schema, []
    chunk = next(iter(read_log_chunks(path, schema, 1 << 16)), None)
    if chunk is None or not chunk.table.num_rows:
        return schema, []
    notes = []
    for col in (schema.user_col, schema.item_col):
        cells = pc.utf8_trim_whitespace(pc.fill_null(chunk.table.column(col), ""))
        empty = pc.sum(pc.equal(cells, "")).as_py() or 0
        share = empty / chunk.table.num_rows
        if share >= EMPTY_IDS_SHARE and empty >= EMPTY_IDS_ROWS:
            notes.append(f"skip_empty_ids = true: {col!r} is empty on {share:.1%} of the first "
                         f"{chunk.table.num_rows} rows (a guest's, a page view): such rows are skipped "
                         "and counted, not bad rows")
    if not notes:
        return schema, []
    log.warning("reading %s", notes[0])
    return replace(schema, skip_empty_ids=True), notes[:1]


def schema_for(path: str | Path, overrides: LogSchema | None = None, **names: Any) -> LogSchema:
    """The schema to read ``path`` with: ``overrides`` as is when it describes every feature
    column of the log (no pass over the data), else inferred with ``overrides`` winning."""
    base, _ = _names_schema(path, overrides, names)
    described = {c.name for c in base.columns} | set(base.reserved())
    if all(c in described for c in log_columns(path, base)):
        return base
    return _infer(path, base, 1 << 18, 100_000)[0]


def infer_schema(path: str | Path, overrides: LogSchema | None = None, *, chunk_rows: int = 1 << 18,
                 distinct_cap: int = 100_000, **names: str) -> tuple[LogSchema, LogStats]:
    """Reads the whole log in chunks and infers every feature column's kind and side.

    Rules, in order, for a column not named in ``overrides``:

    - **ignore**: at most one distinct cell value (empty counts as a value), e.g. all empty;
    - **multi**: at least 2% of its non-empty cells contain the separator ``|``; or ``;`` or
      ``,``, when most values between them are in several distinct cells (a list, not a title);
    - **numeric**: every non-empty cell parses as a finite float (or has a decimal comma,
      ``3,5``: ``decimal = ","``), unless it is a *code*: all
      integers and either at most 20 distinct values that repeat (no more than 5% of the
      non-empty cells: a rating, a position, an age bracket, a flag) or a name ending in ``id``
      (``shop_id``, ``zipId``) -> categorical;
    - **text**: item side, not numeric, at least half of its non-empty cells hold words (a
      space between two non-spaces) and at least half as many distinct values as there are
      items: a title or a description, nearly one per item (no feature: the LLM rerank reads
      it; as a categorical it would only repeat the item id);
    - **categorical**: anything else (strings, mixed cells).

    Side: **item** if the column never varies within an item (the same cell on every row of an
    item), else **user** (a user or request attribute, or per-event context).

    ``overrides`` (a schema file) wins: its column specs replace inferred ones and its reserved
    names are used. ``names`` sets ``user_col``/``item_col``/``label_col``/``time_col``/
    ``truth_col``/``positive_threshold`` directly (flags; they win over the file).
    """
    base, notes = _names_schema(path, overrides, names)
    schema, stats = _infer(path, base, chunk_rows, distinct_cap)
    stats.notes = notes + stats.notes
    return schema, stats


def _infer(path: str | Path, base: LogSchema, chunk_rows: int, distinct_cap: int) -> tuple[LogSchema, LogStats]:
    header = log_columns(path, base)
    reserved = set(base.reserved())
    features = [c for c in header if c not in reserved]
    stats = LogStats(columns={c: ColumnStats(c) for c in header})
    distinct: dict[str, set] = {c: set() for c in header}
    by_item, by_user = _Constancy(features), _Constancy(features)
    given = {c.name: c for c in base.columns}
    sample = LeakSample([c for c in features if c not in given])
    tables = [t for t in (item_table(base), user_table(base)) if t is not None]
    joined_before = [(t.joined, t.unmatched) for t in tables]
    positives = good = 0
    runs, last_user = 0, None  # runs of rows of one user, in file order
    t_min, t_max = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    # The label column's cells, while they are few, for a label the schema does not define yet.
    labels: Counter[str] | None = (Counter() if not base.positive_values and not base.implicit
                                   and base.positive_threshold is None else None)
    for chunk in read_log_chunks(path, base, chunk_rows):
        stats.rows += chunk.table.num_rows + len(chunk.invalid)
        if labels is not None:
            counts = pc.value_counts(chunk.table.column(base.label_col)).to_pylist()
            labels.update({c["values"]: c["counts"] for c in counts if c["values"] is not None})
            if len(labels) > LABEL_VALUES:
                labels = None
        checks = RowChecks(chunk)
        core = parse_core(chunk, base, checks)
        bad_rows = chunk.invalid + checks.rows()
        stats.bad_rows += len(bad_rows)
        stats.skipped_rows += checks.skipped
        stats.bad_examples += [f"line {b.line}, column {b.column!r}: {b.reason}"
                               for b in sorted(bad_rows, key=lambda b: b.line)][:5 - len(stats.bad_examples)]
        ok = ~checks.bad
        good += int(ok.sum())
        users = core.user_id[ok]
        if len(users):
            runs += int((users[1:] != users[:-1]).sum()) + int(users[0] != last_user)
            last_user = users[-1]
        positives += int(core.label[ok].sum())
        if ok.any():
            t_min, t_max = min(t_min, int(core.ts_ms[ok].min())), max(t_max, int(core.ts_ms[ok].max()))
        hashed = {}
        for c in header:
            _count_column(stats.columns[c], chunk.table.column(c), distinct[c], distinct_cap)
            if c in features and (c not in by_item.varies or c not in by_user.varies):
                hashed[c] = feature_ids(c, chunk.table.column(c))[ok]
        by_item.update(core.item_id[ok], hashed)
        sample.add(chunk.table, core.item_id, core.label, ok, core.user_id, core.ts_ms)
        by_user.update(core.user_id[ok], hashed)
    for c in header:
        cs = stats.columns[c]
        cs.distinct = len(distinct[c])
        cs.separator = _list_separator(cs, distinct[c])
        cs.varies_within_item, cs.varies_within_user = c in by_item.varies, c in by_user.varies
    stats.label_rate = positives / good if good else float("nan")
    users = stats.columns[base.user_col].distinct
    if (not base.time_col and not stats.columns[base.user_col].distinct_capped and good >= 2 * users
            and runs <= GROUPED_RUNS * users):
        stats.notes.append(f'time_col = "": the rows are grouped by user ({users} users, {runs} runs of '
                           "rows): file order is no time order, so the progressive AUC says how fast each "
                           "new user is learned; name the time column if the log has one")
    for table, (joined, unmatched) in zip(tables, joined_before):
        joined, unmatched = table.joined - joined, table.unmatched - unmatched
        if unmatched:
            stats.notes.append(f"{table.side}s_file: {unmatched} of the {joined} rows "
                               f"({unmatched / max(joined, 1):.1%}) "
                               f"name {'an' if table.side == 'item' else 'a'} {table.side} {Path(table.path).name} "
                               f"does not list (their {table.side} columns read empty)")
    if labels and set(labels) - {"0", "1"}:
        stats.label_values = labels.most_common(10)
    if good:
        stats.time_min, stats.time_max = _iso(t_min), _iso(t_max)
    items = stats.columns[base.item_col].distinct
    specs = tuple(given.get(c) or _infer_column(stats.columns[c], items) for c in features)
    left_out = sample.findings([s for s in specs if s.name not in given], base.implicit)
    specs = tuple(replace(s, kind="ignore") if s.name in left_out else s for s in specs)
    stats.notes += [f"{name} ignored: {why}" for name, why in left_out.items()]
    for note in stats.notes:
        log.warning("reading %s", note)
    log.info("inferred the schema of %s: %d rows, %d bad, %d feature columns", path, stats.rows,
             stats.bad_rows, len(specs))
    return replace(base, columns=specs), stats


def _count_column(cs: ColumnStats, col: pa.ChunkedArray, seen: set, cap: int) -> None:
    col = pc.fill_null(col, "")  # null (CSV) and "" (Parquet) are both an empty cell
    cs.cells += len(col)
    cs.empty += int(pc.sum(pc.equal(col, "")).as_py() or 0)
    uniques = pc.unique(col)
    if not cs.distinct_capped:
        seen.update(uniques.to_pylist())
        cs.distinct_capped = len(seen) >= cap
    nonempty = uniques.filter(pc.not_equal(uniques, ""))
    if cs.numeric and len(nonempty):
        values, bad = parse_floats(nonempty)
        cs.numeric = not (bad.any() or np.isinf(values).any())
    if cs.comma_decimal and len(nonempty):
        cs.comma_decimal = bool(pc.all(pc.match_substring_regex(nonempty, _COMMA_NUMBER.pattern)).as_py())
    if cs.integer and len(nonempty):
        cs.integer = bool(pc.all(pc.match_substring_regex(nonempty, INT_CELL)).as_py())
    cs.with_separator += int(pc.sum(pc.match_substring(col, "|")).as_py() or 0)
    for sep in OTHER_SEPARATORS:
        has = pc.match_substring_regex(col, _ID_LIST) if sep == " " else pc.match_substring(col, sep)
        cs.with_other[sep] = cs.with_other.get(sep, 0) + int(pc.sum(has).as_py() or 0)
    cs.with_space += int(pc.sum(pc.match_substring_regex(col, r"\S\s+\S")).as_py() or 0)


def _list_separator(cs: ColumnStats, cells: set) -> str:
    """``|`` when enough cells hold one; else ``;`` or ``,`` when enough cells hold it and most
    values between them are in several distinct cells (a list of genres or tags; not a title
    with a comma, an address, or decimal commas); else ``""``."""
    nonempty = max(1, cs.cells - cs.empty)
    if cs.with_separator >= MULTI_SHARE * nonempty:
        return "|"
    for sep in OTHER_SEPARATORS:
        if cs.with_other.get(sep, 0) < MULTI_SHARE * nonempty:
            continue
        if (sep == "," and all(_COMMA_NUMBER.match(v) for v in cells if v and sep in v)
                and not _LIST_NAME.search(re.sub(r"[^a-z]", "", cs.name.lower()))):
            continue  # 3,5: decimal commas (but KuaiRand's tag "19,59" is two tags)
        cells_of = Counter(t for v in cells if v for t in {t.strip() for t in v.split(sep)} - {""})
        if cells_of and sum(n > 1 for n in cells_of.values()) >= LIST_TOKENS * len(cells_of):
            return sep
    return ""


# Ids separated by spaces, each letters then a digit then letters or digits ("N123 N456", "12 34";
# not "2019-11-09 12:00:27").
_ID_LIST = r"^\s*[A-Za-z_]*\d\w*(\s+[A-Za-z_]*\d\w*)+\s*$"
# A column so named holds lists: "19,59" is two tags, not a decimal comma.
_LIST_NAME = re.compile(r"(tags?|genres?|categories|keywords|topics|ids)$")
_COMMA_NUMBER = re.compile(r"^\s*[+-]?([0-9]+|[0-9]*,[0-9]+)\s*$")  # an integer, or a number with a decimal comma


def _is_id_name(name: str) -> bool:
    """A name that says its integers are codes: an id, or a code, class or category (Ta-Feng's
    ``PRODUCT_SUBCLASS`` and ``PIN_CODE``, ``brand``, ``zip``)."""
    low = name.lower()
    return (low == "id" or low.endswith(("_id", "-id", " id")) or name.endswith(("Id", "ID"))
            or re.sub(r"[^a-z]", "", low).endswith(_CODE_WORDS))


_CODE_WORDS = ("code", "class", "category", "categ", "cat", "group", "brand", "zip")


def _infer_column(cs: ColumnStats, items: int) -> ColumnSpec:
    """The rules of :func:`infer_schema`, on one column's counts (``items``: distinct items)."""
    side = "user" if cs.varies_within_item else "item"
    if cs.distinct <= 1:
        return ColumnSpec(cs.name, "ignore", side)
    if cs.separator:
        return ColumnSpec(cs.name, "multi", side, separator=cs.separator)
    values = cs.distinct - (1 if cs.empty else 0)  # distinct non-empty values
    few = values <= CODE_DISTINCT and values <= CODE_SHARE * (cs.cells - cs.empty)
    code = cs.integer and (few or _is_id_name(cs.name))
    if cs.numeric and not code:
        return ColumnSpec(cs.name, "numeric", side)
    if not cs.numeric and cs.comma_decimal and cs.with_other.get(",", 0):  # 3,5: a European export
        return ColumnSpec(cs.name, "numeric", side, decimal=",")
    if (side == "item" and not cs.numeric and cs.with_space >= TEXT_SHARE * (cs.cells - cs.empty)
            and values >= TEXT_DISTINCT * items):
        return ColumnSpec(cs.name, "text", side)
    return ColumnSpec(cs.name, "categorical", side)

"""Encodes a whole interaction log into columns, and turns it into requests or training examples.

:func:`encode_log` reads the file in chunks (see :mod:`streams.log_source`), hashes every
categorical and multi-valued cell into feature ids (:func:`streams.log_schema.feature_ids`),
sorts the rows by event time (stable) and standardises numeric columns online. Two views of the
result feed the rest of the system and agree by construction:

- :func:`log_requests` — impressions and clicks for Kafka (``headwater replay``): rows of one
  user at one time form one request; label 1 is a click 1 ms after the impression;
- :func:`log_examples` — the ExampleBatch rows the joiner would build from those requests (same
  request ids, same example ids, sample rate 1), for broker-free benches and training.

Request-level (user-side) slots travel once per request in ``Impression.user_sparse``, so they
take the value of the request's first row; :class:`EncodedLog` stores them that way too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streams.events import Action, ExampleBatch, Impression, Ragged, SchemaError, request_hash
from streams.ids import row_example_ids
from streams.log_schema import ColumnSpec, LogSchema, feature_ids
from streams.log_items import log_columns, read_log_chunks
from streams.log_merge import engaged_views, once_each
from streams.log_history import RECENT_SLOT, recent_positives
from streams.log_negatives import negative_plan
from streams.log_formats import source_name
from streams.log_cells import parse_floats
from streams.log_source import BadRow, RawChunk, RowChecks, parse_core
from streams.log_text import ItemTexts

__all__ = ["EncodedLog", "BadRow", "encode_log", "log_requests", "log_examples", "request_ids",
           "log_entities", "source_name"]

log = logging.getLogger(__name__)

ON_BAD_ROW = ("error", "dead-letter")
Z_CLIP = 5.0  # standardised values are clipped: early rows see few values and a tiny spread


@dataclass
class EncodedLog:
    """One whole log, encoded, sorted by event time (stable): one entry per usable row."""

    user_id: np.ndarray  # int64[n]
    item_id: np.ndarray  # int64[n]
    label: np.ndarray  # float32[n] 0/1
    ts_ms: np.ndarray  # int64[n]
    truth_p: np.ndarray  # float32[n], NaN when unknown (for every row of its request)
    sparse: dict[str, Ragged]  # every categorical/multi slot, one bag per row
    dense: np.ndarray  # float32[n, len(schema.dense_names())], standardised online
    source_line: np.ndarray  # int64[n] line (CSV) / row (Parquet) number
    schema: LogSchema
    bad_rows: list[BadRow] = field(default_factory=list)  # dead-lettered, in file order
    item_text: dict[int, str] = field(default_factory=dict)  # item -> its text (text columns)
    duplicate_rows: int = 0  # rows that repeated an earlier row's user, item and time (merged)
    folded_engagements: int = 0  # engagement rows folded into the view they followed (streams.log_merge)
    skipped_rows: int = 0  # rows without a user or item, skipped by the schema's skip_empty_ids

    def __len__(self) -> int:
        return len(self.user_id)


def encode_log(path: str | Path, schema: LogSchema, on_bad_row: str = "error",
               chunk_rows: int = 65536) -> EncodedLog:
    """Reads and encodes the log at ``path`` (CSV, TSV, Parquet or JSON Lines) with ``schema``.

    A bad row (wrong number of cells, a label that is not 0/1, a time that does not parse, an
    empty user or item, a numeric cell that is not a number): with ``on_bad_row="error"`` the
    first one raises :class:`SchemaError` naming file, line and column; with ``"dead-letter"``
    every one is kept in ``bad_rows`` and left out of the encoded rows.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    log_columns(path, schema)  # checks the reserved and described columns are there
    features = [c for c in schema.columns if c.kind not in ("ignore", "text")]
    texts = ItemTexts(schema.text_columns())
    parts: dict[str, list] = {k: [] for k in ("user", "item", "label", "ts", "truth", "line")}
    bags: dict[str, list[Ragged]] = {c.name: [] for c in features if c.kind != "numeric"}
    raw: dict[str, list[np.ndarray]] = {c.name: [] for c in features if c.kind == "numeric"}
    bad_rows: list[BadRow] = []
    skipped = 0
    for chunk in read_log_chunks(path, schema, chunk_rows):
        checks = RowChecks(chunk)
        core = parse_core(chunk, schema, checks)
        skipped += checks.skipped
        encoded = {c.name: _encode_column(c, chunk, checks) for c in features}
        found = sorted(chunk.invalid + checks.rows(), key=lambda b: b.line)
        if found and on_bad_row == "error":
            raise SchemaError(f"{found[0].message(path)} (--on-bad-row dead-letter sets bad rows aside, "
                              "each with its reason, and reads the rest)")
        bad_rows += found
        keep = np.flatnonzero(~checks.bad)
        texts.add(chunk.table, core.item_id, core.ts_ms, chunk.line, keep)
        for k, v in (("user", core.user_id), ("item", core.item_id), ("label", core.label),
                     ("ts", core.ts_ms), ("truth", core.truth_p), ("line", chunk.line)):
            parts[k].append(v[keep])
        for name, value in encoded.items():
            (bags[name] if name in bags else raw[name]).append(
                value.take(keep) if isinstance(value, Ragged) else value[keep])
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    if (bad_rows or skipped) and not len(cat["line"]):
        if not bad_rows:
            raise SchemaError(f"every row of {path} lacks a user or an item ({skipped} rows skipped)")
        raise SchemaError(f"every row of {path} is bad ({len(bad_rows)} rows; the first: "
                          f"{bad_rows[0].message(path)}): check the schema --inspect prints")
    order = np.argsort(cat["ts"], kind="stable")
    keep, merged_label = once_each(cat["user"][order], cat["item"][order], cat["ts"][order], cat["label"][order])
    duplicates = len(order) - len(keep)
    order = order[keep]
    engaged = 0
    if schema.positive_values:  # an event log: a view and the engagements that followed it are one example
        keep, merged_label = engaged_views(cat["user"][order], cat["item"][order], cat["ts"][order], merged_label)
        engaged = len(order) - len(keep)
        order = order[keep]
    user, ts = cat["user"].astype(np.int64)[order], cat["ts"].astype(np.int64)[order]
    starts = _request_starts(user, ts)
    first_row = np.repeat(starts[:-1], np.diff(starts))  # each row's request's first row
    sparse = {}
    for c in features:
        if c.kind == "numeric":
            continue
        rag = _concat(bags[c.name]).take(order)
        sparse[c.name] = rag.take(first_row) if c.side == "user" else rag
    # A user-side number is the request's (its first row's), as a user-side slot is: one Recommend
    # call's dense vector, and a sampled negative's too (a row's own value beside its positive
    # and the first row's beside the negatives told them apart). Statistics are taken once per
    # request (user side) or once per item, at its first appearance (item side): an item's
    # features stay what hw.items published for it.
    item = cat["item"].astype(np.int64)[order]
    _, first_of_item, item_inv = np.unique(item, return_index=True, return_inverse=True)
    ref = {"user": first_row, "item": first_of_item[item_inv]}
    dense_cols = []
    for name in schema.numeric_columns():
        values = (np.concatenate(raw[name]) if raw[name] else np.zeros(0))[order]
        side = schema.column(name).side
        dense_cols += list(standardise_online(values[first_row] if side == "user" else values, ref[side]))
    n = len(order)
    dense = np.stack(dense_cols, 1).astype(np.float32) if dense_cols else np.zeros((n, 0), np.float32)
    truth = cat["truth"].astype(np.float32)[order]
    label, line = merged_label.astype(np.float32), cat["line"].astype(np.int64)[order]
    if schema.recent_items:  # the user's last positives before each request (never the negatives)
        sparse[RECENT_SLOT] = recent_positives(user, ts, item, label, starts, schema.recent_items)
    if schema.negatives:
        plan = negative_plan(item, label, starts, schema.negatives, schema.negative_sampling)
        u, i = plan.user_row, plan.item_row
        user, ts, item, line, truth = user[u], ts[u], item[i], line[u], truth[u]
        label = np.where(plan.negative, np.float32(0), label[u])
        truth[plan.negative] = np.nan
        sparse = {c: rag.take(i if c in schema.item_slots() else u) for c, rag in sparse.items()}
        split = dense.shape[1] - schema.item_dense_width()
        dense = np.concatenate([dense[u, :split], dense[i, split:]], axis=1)
        starts, n = _request_starts(user, ts), len(user)
    unknown = np.isnan(truth)
    if unknown.any():  # an impression carries truth for all of its items or for none
        per_request = np.add.reduceat(unknown, starts[:-1]) > 0 if n else np.zeros(0, bool)
        truth[np.repeat(per_request, np.diff(starts))] = np.nan
    bad_rows.sort(key=lambda b: b.line)
    if duplicates:
        log.warning("%s: %d rows repeat an earlier row's user, item and time: each such event is "
                    "learned once (a positive if any copy is)", path, duplicates)
    if engaged:
        log.info("%s: %d engagement rows folded into the view they followed (one positive example each)",
                 path, engaged)
    if bad_rows:
        log.warning("%s: %d bad rows dead-lettered (first: %s)", path, len(bad_rows),
                    bad_rows[0].message(path))
    if skipped:
        log.info("%s: %d rows without a user or item skipped", path, skipped)
    return EncodedLog(user, item, label, ts, truth, sparse, dense, line, schema, bad_rows, texts.result(),
                      duplicates, engaged, skipped)


def log_entities(path: str | Path, schema: LogSchema, chunk_rows: int = 1 << 18
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(users, items): every user id and item id of the log's good rows, as :func:`encode_log`
    encodes them, each once, in the order a replay first sends them (event time, then file
    order). One chunked pass that keeps only the distinct ids, not the rows."""
    firsts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {"user": [], "item": []}
    done = 0
    for chunk in read_log_chunks(path, schema, chunk_rows):
        checks = RowChecks(chunk)
        core = parse_core(chunk, schema, checks)
        ok = np.flatnonzero(~checks.bad)
        for k, ids in (("user", core.user_id), ("item", core.item_id)):
            firsts[k].append(_first_seen(ids[ok], core.ts_ms[ok], ok + done))
        done += chunk.table.num_rows
    out = []
    for k in ("user", "item"):
        parts = firsts[k]
        if not parts:
            out.append(np.zeros(0, np.int64))
            continue
        ids, ts, pos = (np.concatenate(x) for x in zip(*parts))
        ids, ts, pos = _first_seen(ids, ts, pos)
        out.append(ids[np.lexsort((pos, ts))])
    return out[0], out[1]


def _first_seen(ids: np.ndarray, ts: np.ndarray, pos: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each distinct id once, with the (time, position) of its earliest row."""
    order = np.lexsort((pos, ts, ids))
    first = np.ones(len(order), bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    keep = order[first]
    return ids[keep].astype(np.int64), ts[keep], pos[keep]


def _encode_column(c: ColumnSpec, chunk: RawChunk, checks: RowChecks) -> Ragged | np.ndarray:
    col = chunk.table.column(c.name)
    if c.kind == "categorical":
        ids = feature_ids(c.name, col)
        return Ragged(ids, np.ones(len(ids), np.int32))
    if c.kind == "multi":
        return multi_ids(c.name, col, c.separator)
    if c.decimal != ".":  # 3,5 -> 3.5
        col = pc.replace_substring(col, c.decimal, ".")
    values, bad = parse_floats(col)
    bad |= np.isinf(values)
    checks.add(bad, c.name, lambda i: f"{col[i].as_py()!r} is not a finite number")
    return values


def multi_ids(slot: str, col: pa.ChunkedArray | pa.Array, separator: str = "|") -> Ragged:
    """One bag of ids per cell: the cell split on ``separator``, tokens trimmed, empty tokens
    dropped; a cell with no token is one "" (the slot's missing id)."""
    col = pc.fill_null(col, "")
    lists = pc.split_pattern(col, separator)
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    n = len(lists)
    counts = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    tokens = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    row = np.repeat(np.arange(n), counts)
    kept = pc.not_equal(tokens, "").to_numpy(zero_copy_only=False)
    lengths = np.bincount(row[kept], minlength=n)
    none = np.flatnonzero(lengths == 0)
    ids = np.concatenate([feature_ids(slot, tokens.filter(pa.array(kept))),
                          np.full(len(none), feature_ids(slot, [""])[0], np.int64)])
    rows = np.concatenate([row[kept], none])
    lengths[none] = 1
    return Ragged(ids[np.argsort(rows, kind="stable")], lengths.astype(np.int32))


def standardise_online(x: np.ndarray, ref: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(standardised value, missing indicator) of a numeric column in event-time order.

    Row t is standardised with the mean and standard deviation of the non-missing values of the
    rows before row ``ref[t]`` (default ``t``; ``ref[t] <= t``, so never a look-ahead); 0 until
    two values were seen or while they are all equal; clipped to ``±Z_CLIP``. A missing (NaN)
    cell is 0 with indicator 1. Sums run relative to the first value so the variance keeps its
    precision over millions of rows.
    """
    seen = ~np.isnan(x)
    if not seen.any():
        return np.zeros(len(x), np.float32), np.ones(len(x), np.float32)
    ref = np.arange(len(x)) if ref is None else np.asarray(ref, np.int64)
    d = np.where(seen, x - x[seen][0], 0.0)
    cnt = np.concatenate(([0], np.cumsum(seen)[:-1])).astype(np.float64)[ref]
    s1 = np.concatenate(([0.0], np.cumsum(d)[:-1]))[ref]
    s2 = np.concatenate(([0.0], np.cumsum(d * d)[:-1]))[ref]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / cnt
        std = np.sqrt(np.maximum(s2 / cnt - mean * mean, 0.0))
        z = (d - mean) / std
    usable = seen & (cnt >= 2) & (std > 1e-12 * np.maximum(1.0, np.abs(mean)))
    z = np.where(usable, np.clip(z, -Z_CLIP, Z_CLIP), 0.0)
    return z.astype(np.float32), (~seen).astype(np.float32)


def _concat(parts: list[Ragged]) -> Ragged:
    if not parts:
        return Ragged.empty(0)
    return Ragged(np.concatenate([p.values for p in parts]).astype(np.int64, copy=False),
                  np.concatenate([p.lengths for p in parts]).astype(np.int32, copy=False))


def _request_starts(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """int64[r + 1]: first row of each request, then n. A request is a run of rows (in event
    time order) with one user and one time."""
    new = np.ones(len(user), bool)
    new[1:] = (user[1:] != user[:-1]) | (ts[1:] != ts[:-1])
    return np.append(np.flatnonzero(new), len(user)).astype(np.int64)


def request_ids(log: EncodedLog, source: str) -> tuple[np.ndarray, list[str]]:
    """(request start rows int64[r + 1], request ids): ``source:user:time_ms:first_row``.

    The one place request ids are made: both views of a log use it, so their example ids agree.
    """
    starts = _request_starts(log.user_id, log.ts_ms)
    firsts = starts[:-1]
    ids = [f"{source}:{u}:{t}:{a}" for u, t, a in
           zip(log.user_id[firsts].tolist(), log.ts_ms[firsts].tolist(), firsts.tolist())]
    return starts, ids


def log_requests(log: EncodedLog, source: str, block_rows: int = 8192
                 ) -> Iterator[tuple[Impression, list[Action]]]:
    """The log as requests in event-time order: one impression per request, one click action
    (at the impression's time + 1 ms) per row labelled 1."""
    starts, ids = request_ids(log, source)
    schema = log.schema
    user_slots, item_slots = schema.user_slots(), schema.item_slots()
    has_dense = log.dense.shape[1] > 0
    r = 0
    while r < len(ids):
        # Python lists for a block of whole requests, converted once, then sliced per request.
        r_end = int(np.searchsorted(starts, starts[r] + block_rows, side="right")) - 1
        r_end = max(r_end, r + 1)
        lo, hi = int(starts[r]), int(starts[r_end])
        items = log.item_id[lo:hi].tolist()
        labels = log.label[lo:hi].tolist()
        dense = log.dense[lo:hi].tolist() if has_dense else None
        truth = log.truth_p[lo:hi]
        truth_list = truth.tolist()
        bags = {s: _row_lists(log.sparse[s], lo, hi) for s in (*user_slots, *item_slots)}
        for q in range(r, r_end):
            a, b = int(starts[q]) - lo, int(starts[q + 1]) - lo
            rid, user, t = ids[q], int(log.user_id[lo + a]), int(log.ts_ms[lo + a])
            its = items[a:b]
            imp = Impression(rid, user, t, its,
                             item_sparse={s: bags[s][a:b] for s in item_slots},
                             user_sparse={s: bags[s][a] for s in user_slots},
                             dense=dense[a:b] if dense is not None else None,
                             truth_p=None if np.isnan(truth[a]) else truth_list[a:b])
            clicks = [Action(rid, user, i, "click", 1.0, t + 1)
                      for i, y in zip(its, labels[a:b]) if y > 0]
            yield imp, clicks
        r = r_end


def _row_lists(rag: Ragged, lo: int, hi: int) -> list[list[int]]:
    off = rag.offsets
    values = rag.values[off[lo]:off[hi]].tolist()
    bounds = (off[lo:hi + 1] - off[lo]).tolist()
    return [values[bounds[k]:bounds[k + 1]] for k in range(hi - lo)]


def log_examples(log: EncodedLog, source: str, batch_rows: int = 65536) -> Iterator[ExampleBatch]:
    """The examples the joiner builds from :func:`log_requests` (sample rate 1), in log order,
    ``batch_rows`` rows per batch: same example ids, labels, slots and dense rows."""
    n = len(log)
    if n == 0:
        return
    starts, ids = request_ids(log, source)
    counts = np.diff(starts)
    req_hash = np.fromiter((request_hash(r) for r in ids), np.uint64, len(ids))
    request_of_row = np.repeat(np.arange(len(ids)), counts)
    example_id = row_example_ids(log.item_id, req_hash[request_of_row])
    label = _joined_labels(log.label, log.item_id, request_of_row)
    schema = log.schema
    sparse = {"user_id": Ragged(log.user_id, np.ones(n, np.int32)),
              "item_id": Ragged(log.item_id, np.ones(n, np.int32))}
    for slot in (*sorted(schema.user_slots()), *sorted(schema.item_slots())):
        sparse[slot] = log.sparse[slot]
    full = ExampleBatch(example_id=example_id, user_id=log.user_id, item_id=log.item_id, label=label,
                        sample_rate=np.ones(n, np.float32), event_time_ms=log.ts_ms, sparse=sparse,
                        dense=log.dense, truth_p=log.truth_p)
    for lo in range(0, n, batch_rows):
        yield full.take(np.arange(lo, min(n, lo + batch_rows)))


def _joined_labels(label: np.ndarray, items: np.ndarray, request_of_row: np.ndarray) -> np.ndarray:
    """Labels as the joiner sets them: a click names an item, and the joiner labels that item's
    first row in the request, so an item shown twice in one request is labelled once."""
    order = np.lexsort((np.arange(len(items)), items, request_of_row))
    r, i = request_of_row[order], items[order]
    first = np.ones(len(order), bool)
    first[1:] = (r[1:] != r[:-1]) | (i[1:] != i[:-1])
    if first.all():
        return label.astype(np.float32, copy=True)
    group_start = np.flatnonzero(first)
    any_pos = np.maximum.reduceat(label[order], group_start)
    out = np.zeros(len(label), np.float32)
    out[order[group_start]] = any_pos
    return out

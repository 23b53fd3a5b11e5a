"""Scoring with a replica: many ranking jobs, one vectorised model forward.

A :class:`RankJob` is one ``Recommend`` call: a user, its request-level sparse bags, optional
dense features and N candidate items. Request-level bags are pooled once per *job* and broadcast
to its candidates by index, so a batch of B jobs with N candidates in all costs B bag lookups per
context slot, one id lookup for the item slot and one tower forward over N rows. A sharded
(remote) table is given all the batch's ids first, so it makes one round trip per shard per batch.

Item-side features (no train/serve skew): given an item catalog (:class:`ItemSource`, serving's
``serving.item_catalog.ItemCatalog``), every model slot the catalog holds bags for and a call did
not send as context is read *per candidate* from the catalog, and the catalog's dense tail (the
item-side columns, last in the dense layout) is appended to the call's user-side dense part, so a
call naming only candidate ids gets the features the trainer saw. Without a catalog, or when it
holds nothing the model uses, the batch takes exactly the plain path.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Protocol, Sequence

import numpy as np
import torch

from embedding_store.batched_read import read_rows
from streams.example_batch import Ragged
from training.model import cross_bags, cross_parts
from serving.calibration import Calibrator, calibrated

if TYPE_CHECKING:
    from serving.item_catalog import ItemRows

__all__ = ["ServingModel", "RankJob", "ItemSource", "score_jobs", "score_examples", "ExampleRows",
           "item_dense_width"]


@dataclass(frozen=True)
class ServingModel:
    """An immutable view of the replica that one batch is scored with.

    ``table`` is an ``embedding_store.EmbeddingTable`` (its own lock makes reads safe while the
    parameter server imports deltas); ``tower`` a ``training.model.DenseTower`` that is replaced,
    never mutated, when new dense weights arrive.
    """

    model_id: str
    table: Any
    tower: Any
    version: int
    watermark_ms: int

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(self.tower.cfg.slots)

    @property
    def dense_dim(self) -> int:
        return int(self.tower.cfg.dense_dim)


@dataclass
class RankJob:
    """One ranking request: ``items`` (int64[N]) scored for ``user_id`` with request-level features."""

    user_id: int
    items: np.ndarray
    context: Mapping[str, np.ndarray] = field(default_factory=dict)  # slot -> int64 ids
    # float32[dense_dim], or only the user-side part when an item catalog adds the item-side
    # tail (see item_dense_width), or None (zeros; the catalog's tail still added)
    dense: np.ndarray | None = None


class ItemSource(Protocol):
    """Item-side features per candidate (``serving.item_catalog.ItemCatalog``)."""

    @property
    def slots(self) -> frozenset[str]: ...

    @property
    def dense_width(self) -> int: ...

    def rows(self, items: np.ndarray, slots: Sequence[str], dense: bool) -> "ItemRows": ...


def item_dense_width(model: "ServingModel", items: ItemSource | None) -> int:
    """Columns of the model's dense input that ``items`` supplies per candidate (0: none): the
    catalog's tail when the model's dense vector has room for it."""
    if items is None:
        return 0
    width = items.dense_width
    return width if 0 < width <= model.dense_dim else 0


_COMPILED: "weakref.WeakKeyDictionary[Any, dict[Any, Any]]" = weakref.WeakKeyDictionary()
_COMPILE_LOCK = threading.RLock()  # re-entrant: a batch forward compiles its tower first


def _compiled(tower: Any, key: Any, build: Callable[[], Any]) -> Any:
    """What ``build()`` compiles for ``tower``, once per tower object and ``key``."""
    per = _COMPILED.get(tower)
    if per is None or key not in per:
        with _COMPILE_LOCK:
            per = _COMPILED.setdefault(tower, {})
            if key not in per:
                per[key] = build()
    return per[key]


def _compiled_tower(tower: Any, bf16: bool) -> Any:
    """``tower`` traced with TorchScript, once per tower object; a tower with parameters off the
    CPU is returned as it is. Towers are values: a new dense snapshot is a new tower object
    (``ServingModel``), never an in-place edit, which a frozen bf16 trace would not see.

    Why: eagerly, each of the tower's ~20 ops releases the GIL and must take it back, and on a
    busy server every re-take waits for the event-loop thread; the traced graph runs with one
    release. In bf16 the trace is also frozen, so weights are cast to bf16 once, not per call.
    The fp32 trace runs exactly the eager ops (bit-identical logits). TorchScript, though
    deprecated, is the graph runner that needs no C++ toolchain at run time (torch.compile does).
    """
    return _compiled(tower, bf16, lambda: _trace(tower, bf16))


def _trace(tower: Any, bf16: bool, wrap: Callable[[Any], torch.nn.Module] | None = None) -> Any:
    """``tower`` traced (and, with ``wrap``, scripted inside ``wrap(trace)``); frozen in bf16.
    A tower off the CPU comes back as it is."""
    if any(p.device.type != "cpu" for p in tower.parameters()):
        return tower
    cfg = tower.cfg
    example = (torch.zeros(2, len(cfg.slots), cfg.embedding_dim),)
    if cfg.dense_dim:
        example += (torch.zeros(2, cfg.dense_dim),)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the slot count is fixed per tower
        warnings.simplefilter("ignore", DeprecationWarning)  # see _compiled_tower
        traced = torch.jit.trace(tower.eval(), example, check_trace=False)
        if wrap is not None:
            traced = torch.jit.script(wrap(traced).eval())
        return torch.jit.freeze(traced) if bf16 else traced


def _float(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits; no call (no GIL round trip) when they already are."""
    return logits if logits.dtype == torch.float32 else logits.float()


def _tower_logits(model: ServingModel, emb: torch.Tensor, dense: torch.Tensor | None,
                  bf16: bool = False) -> torch.Tensor:
    """Tower forward; with ``bf16`` the matmuls run in bfloat16 (fp32 accumulation) via autocast.

    On CPUs with native bf16 this is 2x (200 rows) to 4x (3200 rows) faster, and the gain grows
    with the batch, which is what micro-batching feeds it. Logits differ from fp32 by ~1e-3.
    """
    fn = _compiled_tower(model.tower, bf16) if emb.device.type == "cpu" else model.tower
    args = (emb,) if dense is None else (emb, dense)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = fn(*args)
    return _float(logits)


def _batch_embeddings(tabs: List[torch.Tensor], values: List[torch.Tensor], ids: List[torch.Tensor],
                      lengths: List[Optional[torch.Tensor]], job_of_row: torch.Tensor, mode: str) -> torch.Tensor:
    """float32[rows, slots, dim]: every slot's read, request-level bags broadcast to their rows."""
    read = read_rows(tabs, values, ids, lengths, mode)
    cols: List[torch.Tensor] = []
    for i in range(len(read)):
        bag_lengths = lengths[i]
        if bag_lengths is None:  # the item slot: one row per candidate already
            cols.append(read[i])
        else:
            cols.append(read[i].index_select(0, job_of_row))
    return torch.stack(cols, dim=1).float()


class _LocalBatch(torch.nn.Module):
    """A batch's whole forward on a local table as ONE TorchScript call: read, broadcast, tower,
    calibration.

    Why: the forward thread shares the GIL with the event loop. Each eager torch call between
    the compiled read and the compiled tower released the GIL and then queued to take it back
    from the busy loop; under load a batch's forward took about twice its CPU time. One call
    releases it once per batch. Same ops as the eager path, so fp32 scores are bit-identical.
    """

    def __init__(self, tower: Any) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, tabs: List[torch.Tensor], values: List[torch.Tensor], ids: List[torch.Tensor],
                lengths: List[Optional[torch.Tensor]], job_of_row: torch.Tensor, mode: str,
                shift: float) -> torch.Tensor:
        emb = _batch_embeddings(tabs, values, ids, lengths, job_of_row, mode)
        return calibrated(_float(self.tower(emb)), shift)


class _LocalBatchDense(_LocalBatch):
    """:class:`_LocalBatch` for a tower with dense inputs (per row: its job's dense features)."""

    def forward(self, tabs: List[torch.Tensor], values: List[torch.Tensor], ids: List[torch.Tensor],
                lengths: List[Optional[torch.Tensor]], job_of_row: torch.Tensor, mode: str,
                shift: float, dense: torch.Tensor) -> torch.Tensor:
        emb = _batch_embeddings(tabs, values, ids, lengths, job_of_row, mode)
        return calibrated(_float(self.tower(emb, dense.index_select(0, job_of_row))), shift)


def _row_embeddings(tabs: List[torch.Tensor], values: List[torch.Tensor], ids: List[torch.Tensor],
                    lengths: List[Optional[torch.Tensor]], job_of_row: torch.Tensor, row_bags: List[bool],
                    mode: str) -> torch.Tensor:
    """:func:`_batch_embeddings` where some bags are per candidate row already (``row_bags[i]``:
    item-side slots read from the catalog), so only the others are broadcast."""
    read = read_rows(tabs, values, ids, lengths, mode)
    cols: List[torch.Tensor] = []
    for i in range(len(read)):
        if lengths[i] is None or row_bags[i]:
            cols.append(read[i])
        else:
            cols.append(read[i].index_select(0, job_of_row))
    return torch.stack(cols, dim=1).float()


class _LocalRows(_LocalBatch):
    """:class:`_LocalBatch` with item-side features: per-row bags where ``row_bags`` says so."""

    def forward(self, tabs: List[torch.Tensor], values: List[torch.Tensor], ids: List[torch.Tensor],
                lengths: List[Optional[torch.Tensor]], job_of_row: torch.Tensor, mode: str,
                shift: float, row_bags: List[bool]) -> torch.Tensor:
        emb = _row_embeddings(tabs, values, ids, lengths, job_of_row, row_bags, mode)
        return calibrated(_float(self.tower(emb)), shift)


class _LocalRowsDense(_LocalBatch):
    """:class:`_LocalRows` for a tower with dense inputs, given per row (user part + item tail)."""

    def forward(self, tabs: List[torch.Tensor], values: List[torch.Tensor], ids: List[torch.Tensor],
                lengths: List[Optional[torch.Tensor]], job_of_row: torch.Tensor, mode: str,
                shift: float, row_bags: List[bool], dense: torch.Tensor) -> torch.Tensor:
        emb = _row_embeddings(tabs, values, ids, lengths, job_of_row, row_bags, mode)
        return calibrated(_float(self.tower(emb, dense)), shift)


def _local_batch(tower: Any, bf16: bool, rows: bool = False) -> Any:
    """The compiled one-call forward around ``tower`` (None for a tower off the CPU); ``rows``:
    the variant with item-side (per-row) features."""
    def build() -> Any:
        if rows:
            wrap = _LocalRowsDense if tower.cfg.dense_dim else _LocalRows
        else:
            wrap = _LocalBatchDense if tower.cfg.dense_dim else _LocalBatch
        compiled = _trace(tower, bf16, wrap)
        return None if compiled is tower else compiled
    return _compiled(tower, ("rows" if rows else "batch", bf16), build)


def _score_in_one_call(model: ServingModel, table: Any, queries: list[tuple[str, np.ndarray, np.ndarray | None]],
                       job_of_row: torch.Tensor, dense: np.ndarray | None, calibrator: Calibrator,
                       bf16: bool, row_bags: list[bool] | None = None) -> np.ndarray | None:
    """Probabilities of every row by :class:`_LocalBatch`, or None where it does not apply (a
    remote table, a table or tower off the CPU). With ``row_bags`` (item-side features) it is
    :class:`_LocalRows`, and ``dense`` is per row instead of per job."""
    views_of = getattr(table, "read_views", None)
    if views_of is None:
        return None
    forward = _local_batch(model.tower, bf16, rows=row_bags is not None)
    if forward is None:
        return None
    ids = [torch.from_numpy(np.ascontiguousarray(q_ids, np.int64)) for _, q_ids, _ in queries]
    lengths = [None if n is None else torch.from_numpy(np.ascontiguousarray(n, np.int64)) for _, _, n in queries]
    extra = () if dense is None else (torch.from_numpy(dense),)
    if row_bags is not None:
        extra = (row_bags, *extra)
    with views_of([slot for slot, _, _ in queries]) as views:  # the table's lock: no writer meanwhile
        if views is None:
            return None
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            probs = forward(*views, ids, lengths, job_of_row, model.tower.cfg.pooling, calibrator.shift, *extra)
    return probs.numpy()


def _job_bags(jobs: Sequence[RankJob], slot: str, user_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Every job's bag of ``slot`` as one ragged pair (ids int64[m], lengths int64[B]).

    The user slot's bag is the user id followed by any request-level ids of that slot. Built with
    one concatenation for the whole micro-batch, not per job.
    """
    ctx = [j.context.get(slot) for j in jobs]
    given = [c for c in ctx if c is not None and c.size]
    if user_ids is None:
        lengths = np.fromiter((0 if c is None else c.size for c in ctx), np.int64, len(jobs))
        ids = np.concatenate(given).astype(np.int64, copy=False) if given else np.zeros(0, np.int64)
        return ids, lengths
    if not given:  # the common case: each bag is just the user id
        return user_ids, np.ones(len(jobs), np.int64)
    parts: list[np.ndarray] = []
    for u, c in zip(user_ids, ctx):
        parts.append(u[None])
        if c is not None and c.size:
            parts.append(c)
    lengths = 1 + np.fromiter((0 if c is None else c.size for c in ctx), np.int64, len(jobs))
    return np.concatenate(parts).astype(np.int64, copy=False), lengths


def _prefetched(table: Any, wanted: Mapping[str, np.ndarray]) -> Any:
    """The table to score one batch with, given every slot's ids the batch will look up.

    A remote table (``serving.ps_client.RemoteTable``) fetches them all in one fan-out (one
    round trip per shard, not one per slot) and answers the lookups from that; a local
    ``EmbeddingTable`` has no ``prefetch`` and is used as it is, at no cost.
    """
    prefetch = getattr(table, "prefetch", None)
    return table if prefetch is None else prefetch(wanted)


def _read(table: Any, queries: list[tuple[str, np.ndarray, np.ndarray | None]], mode: str) -> list[torch.Tensor]:
    """Every slot's lookup of one batch: in one call where the table offers ``lookup_many`` (a
    local ``EmbeddingTable``), else one ``lookup`` / ``lookup_bags`` per slot (a remote table)."""
    many = getattr(table, "lookup_many", None)
    if many is not None:
        return many(queries, mode=mode)
    return [table.lookup(slot, torch.from_numpy(ids)) if lengths is None
            else table.lookup_bags(slot, torch.from_numpy(ids), torch.from_numpy(lengths), mode=mode)
            for slot, ids, lengths in queries]


def _item_slots(model: ServingModel, jobs: Sequence[RankJob], items: ItemSource | None,
                user_slot: str, item_slot: str) -> list[str]:
    """The model slots read per candidate from ``items``: those it holds bags in that some job of
    the batch did not send as context (a job that sends one keeps its own bag)."""
    if items is None:
        return []
    held = items.slots
    return [s for s in model.slots if s in held and s not in (user_slot, item_slot)
            and not all(s in j.context for j in jobs)]


def _row_bags(jobs: Sequence[RankJob], slot: str, counts: np.ndarray,
              catalog: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One bag per candidate row of ``slot``: the catalog's, or the job's context bag repeated on
    its rows where the job sent one."""
    if not any(slot in j.context for j in jobs):
        return catalog
    ids, lengths = catalog
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    id_parts, length_parts, row = [], [], 0
    for job, n in zip(jobs, counts.tolist()):
        own = job.context.get(slot)
        if own is None:
            id_parts.append(ids[offsets[row]:offsets[row + n]])
            length_parts.append(lengths[row:row + n])
        else:
            id_parts.append(np.tile(np.asarray(own, np.int64), n))
            length_parts.append(np.full(n, own.size, np.int64))
        row += n
    return np.concatenate(id_parts).astype(np.int64, copy=False), np.concatenate(length_parts)


def _row_dense(jobs: Sequence[RankJob], dense_dim: int, tail: np.ndarray, job_of_row: np.ndarray) -> np.ndarray:
    """float32[rows, dense_dim]: each job's user-side part (zeros when it sent none) followed by
    its candidate's item-side ``tail``; a job that sent the whole vector keeps it on its rows."""
    user = dense_dim - tail.shape[1]
    per_job = np.zeros((len(jobs), dense_dim), np.float32)
    whole = np.zeros(len(jobs), bool)
    for b, job in enumerate(jobs):
        if job.dense is None:
            continue
        d = np.asarray(job.dense, np.float32).reshape(-1)
        if d.size == dense_dim:
            per_job[b], whole[b] = d, True
        elif d.size == user:
            per_job[b, :user] = d
        else:
            raise ValueError(f"job dense has {d.size} values; the model takes {dense_dim} "
                             f"({user} user-side + {tail.shape[1]} item-side)")
    out = per_job[job_of_row]
    add = ~whole[job_of_row]
    out[add, user:] = tail[add]
    return out


def _with_cross_feeds(slots: Sequence[str], crosses: Sequence[str],
                      feeds: dict[str, tuple[np.ndarray, np.ndarray | None]], job_rows: np.ndarray,
                      item_slot: str, per_row: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """``feeds`` in model slot order with every crossed slot's per-row bag added: each part is
    taken per candidate row (a request-level bag repeated on its job's rows) and the pairs
    crossed by :func:`training.model.cross_bags`, the function training derives them with."""
    def rows_of(slot: str) -> tuple[np.ndarray, np.ndarray]:
        ids, lengths = feeds[slot]
        if lengths is None:  # one id per row
            return ids, np.ones(len(ids), np.int64)
        if slot == item_slot or slot in per_row:
            return ids, lengths
        bag = Ragged(ids, lengths.astype(np.int32)).take(job_rows)
        return bag.values, bag.lengths.astype(np.int64)

    out = {}
    for slot in slots:
        if slot in crosses:
            a, b = cross_parts(slot)
            out[slot] = cross_bags(*rows_of(a), *rows_of(b))
        else:
            out[slot] = feeds[slot]
    return out


def score_jobs(model: ServingModel, jobs: Sequence[RankJob], calibrator: Calibrator,
               user_slot: str = "user_id", item_slot: str = "item_id", bf16: bool = False,
               items: ItemSource | None = None) -> list[np.ndarray]:
    """Calibrated click probabilities for every job's items (float32[N_j] per job); ``items``
    fills the item-side features of every candidate (see the module docstring)."""
    counts = np.fromiter((j.items.shape[0] for j in jobs), np.int64, len(jobs))
    total = int(counts.sum())
    job_rows = np.repeat(np.arange(len(jobs)), counts)
    job_of_row = torch.from_numpy(job_rows)
    user_ids = np.fromiter((j.user_id for j in jobs), np.int64, len(jobs))
    cfg = model.tower.cfg
    all_items = np.concatenate([j.items for j in jobs]).astype(np.int64, copy=False)
    per_row = _item_slots(model, jobs, items, user_slot, item_slot)
    tail_width = item_dense_width(model, items)
    if tail_width and all(j.dense is not None and j.dense.size == cfg.dense_dim for j in jobs):
        tail_width = 0  # every call sent the whole dense vector itself
    catalog = items.rows(all_items, per_row, tail_width > 0) if per_row or tail_width else None
    feeds = {}
    for slot in cfg.slots:
        if slot in cfg.crosses:
            continue
        if slot == item_slot:
            feeds[slot] = (all_items, None)
        elif slot in per_row:
            feeds[slot] = _row_bags(jobs, slot, counts, catalog.sparse[slot])
        else:
            feeds[slot] = _job_bags(jobs, slot, user_ids if slot == user_slot else None)
    if cfg.crosses:  # derived per candidate row from their parts, as training derives them
        per_row = per_row + list(cfg.crosses)
        feeds = _with_cross_feeds(cfg.slots, cfg.crosses, feeds, job_rows, item_slot, per_row)
    table = _prefetched(model.table, {slot: ids for slot, (ids, _) in feeds.items()})
    queries = [(slot, ids, lengths) for slot, (ids, lengths) in feeds.items()]
    rows_mode = catalog is not None or bool(cfg.crosses)  # some bags are per candidate row
    row_bags = [slot in per_row for slot in feeds] if rows_mode else None
    dense = None  # per job (plain path) or per row (with the catalog's dense tail)
    if cfg.dense_dim and tail_width:
        dense = _row_dense(jobs, cfg.dense_dim, catalog.dense, job_rows)
    elif cfg.dense_dim:
        dense = np.stack([np.zeros(cfg.dense_dim, np.float32) if j.dense is None
                          else np.asarray(j.dense, np.float32) for j in jobs])
        if rows_mode:  # the per-row forward takes per-row dense
            dense = dense[job_rows]
    probs = _score_in_one_call(model, table, queries, job_of_row, dense, calibrator, bf16, row_bags)
    if probs is None:  # remote table or GPU: the same maths in steps
        with torch.no_grad():
            read = _read(table, queries, cfg.pooling)
            # The item slot (and item-side slots) have one row per candidate; request-level bags
            # are broadcast to theirs.
            pooled = [v if lengths is None or (row_bags is not None and row_bags[i]) else v.index_select(0, job_of_row)
                      for i, (v, (_, lengths)) in enumerate(zip(read, feeds.values()))]
            emb = torch.stack(pooled, dim=1).float() if pooled else torch.zeros(total, 0, cfg.embedding_dim)
            dense_t = None
            if dense is not None:
                dense_t = torch.from_numpy(dense)
                if not rows_mode:
                    dense_t = dense_t.index_select(0, job_of_row)
            probs = calibrator.probabilities(_tower_logits(model, emb, dense_t, bf16)).numpy()
    return np.split(probs, np.cumsum(counts)[:-1])


@dataclass
class ExampleRows:
    """A columnar batch for ``Score``: per slot, ragged ids (values int64[m], lengths int64[B])."""

    size: int
    sparse: dict[str, tuple[np.ndarray, np.ndarray]]
    dense: np.ndarray | None  # float32[B, dense_dim] or None (zeros)


def score_examples(model: ServingModel, rows: ExampleRows, calibrator: Calibrator,
                   bf16: bool = False) -> np.ndarray:
    """Calibrated probabilities float32[B] for explicit rows; a slot not given is an empty bag."""
    cfg = model.tower.cfg
    empty = (np.zeros(0, np.int64), np.zeros(rows.size, np.int64))
    feeds = {slot: rows.sparse.get(slot, empty) for slot in cfg.slots}
    for slot in cfg.crosses:  # derived from its parts, never taken from the request
        a, b = (feeds[p] for p in cross_parts(slot))
        feeds[slot] = cross_bags(a[0], a[1], b[0], b[1])
    table = _prefetched(model.table, {slot: values for slot, (values, _) in feeds.items()})
    with torch.no_grad():
        pooled = _read(table, [(slot, values, lengths) for slot, (values, lengths) in feeds.items()], cfg.pooling)
        emb = torch.stack(pooled, dim=1).float()
        dense = None
        if cfg.dense_dim:
            d = rows.dense if rows.dense is not None else np.zeros((rows.size, cfg.dense_dim), np.float32)
            dense = torch.from_numpy(np.ascontiguousarray(d, np.float32))
        return calibrator.probabilities(_tower_logits(model, emb, dense, bf16)).numpy()

"""A micro-batch's model inputs, assembled from its ranking jobs (:func:`assemble_batch`).

Request-level bags are kept once per *job* (the forward broadcasts them to the job's candidate
rows by index); the item slot has one id per candidate row. With an item catalog
(:class:`~serving.scoring_inputs.ItemSource`), every model slot it holds bags for that a job did not
send as context is read per candidate row, and its dense tail is appended to each job's
user-side dense part. Crossed slots are derived per row from their parts, as training derives
them. Everything is built with one concatenation per slot for the whole batch, not per job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from streams.example_batch import Ragged
from training.model import cross_bags, cross_parts

if TYPE_CHECKING:
    from serving.scoring_inputs import ItemSource, RankJob, ServingModel

__all__ = ["BatchInputs", "assemble_batch", "item_dense_width", "prefetched"]

Query = tuple[str, np.ndarray, "np.ndarray | None"]  # slot, ids, bag lengths (None: one id per row)


@dataclass
class BatchInputs:
    """What one forward over a micro-batch takes (see the module docstring)."""

    counts: np.ndarray  # int64[B]: candidates per job
    job_rows: np.ndarray  # int64[rows]: the job of every candidate row
    queries: list[Query]  # per model slot, in the model's order
    row_bags: list[bool] | None  # per query: bags per row already (None: only the item slot is)
    dense: np.ndarray | None  # float32 per job, or per row where row_bags is set
    table: Any  # the table to read: the model's, or a sharded table's prefetched view


def item_dense_width(model: "ServingModel", items: "ItemSource | None") -> int:
    """Columns of the model's dense input that ``items`` supplies per candidate (0: none): the
    catalog's tail when the model's dense vector has room for it."""
    if items is None:
        return 0
    width = items.dense_width
    return width if 0 < width <= model.dense_dim else 0


def _job_bags(jobs: "Sequence[RankJob]", slot: str, user_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
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


def prefetched(table: Any, wanted: Mapping[str, np.ndarray]) -> Any:
    """The table to score one batch with, given every slot's ids the batch will look up.

    A remote table (``serving.remote_table.RemoteTable``) fetches them all in one fan-out (one
    round trip per shard, not one per slot) and answers the lookups from that; a local
    ``EmbeddingTable`` has no ``prefetch`` and is used as it is, at no cost.
    """
    prefetch = getattr(table, "prefetch", None)
    return table if prefetch is None else prefetch(wanted)


def _item_slots(model: "ServingModel", jobs: "Sequence[RankJob]", items: "ItemSource | None",
                user_slot: str, item_slot: str) -> list[str]:
    """The model slots read per candidate from ``items``: those it holds bags in that some job of
    the batch did not send as context (a job that sends one keeps its own bag)."""
    if items is None:
        return []
    held = items.slots
    return [s for s in model.slots if s in held and s not in (user_slot, item_slot)
            and not all(s in j.context for j in jobs)]


def _row_bags(jobs: "Sequence[RankJob]", slot: str, counts: np.ndarray,
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


def _row_dense(jobs: "Sequence[RankJob]", dense_dim: int, tail: np.ndarray, job_of_row: np.ndarray) -> np.ndarray:
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


def assemble_batch(model: "ServingModel", jobs: "Sequence[RankJob]", items: "ItemSource | None",
                   user_slot: str, item_slot: str) -> BatchInputs:
    """The model inputs of ``jobs`` (see the module docstring)."""
    counts = np.fromiter((j.items.shape[0] for j in jobs), np.int64, len(jobs))
    job_rows = np.repeat(np.arange(len(jobs)), counts)
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
    table = prefetched(model.table, {slot: ids for slot, (ids, _) in feeds.items()})
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
    return BatchInputs(counts, job_rows, queries, row_bags, dense, table)

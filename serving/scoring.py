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

from typing import Any, Sequence

import numpy as np
import torch

from training.model import cross_bags, cross_parts
from serving.calibration import Calibrator
from serving.compiled_forward import score_in_one_call, tower_logits
from serving.feature_assembly import assemble_batch, item_dense_width, prefetched
from serving.scoring_inputs import ExampleRows, ItemSource, RankJob, ServingModel

__all__ = ["ServingModel", "RankJob", "ItemSource", "score_jobs", "score_examples", "ExampleRows",
           "item_dense_width"]


def score_jobs(model: ServingModel, jobs: Sequence[RankJob], calibrator: Calibrator,
               user_slot: str = "user_id", item_slot: str = "item_id", bf16: bool = False,
               items: ItemSource | None = None) -> list[np.ndarray]:
    """Calibrated click probabilities for every job's items (float32[N_j] per job); ``items``
    fills the item-side features of every candidate (see the module docstring)."""
    batch = assemble_batch(model, jobs, items, user_slot, item_slot)
    job_of_row = torch.from_numpy(batch.job_rows)
    row_bags, dense = batch.row_bags, batch.dense
    probs = score_in_one_call(model, batch.table, batch.queries, job_of_row, dense, calibrator, bf16, row_bags)
    if probs is None:  # remote table or GPU: the same maths in steps
        cfg = model.tower.cfg
        with torch.no_grad():
            read = _read(batch.table, batch.queries, cfg)
            # The item slot (and item-side slots) have one row per candidate; request-level bags
            # are broadcast to theirs.
            pooled = [v if lengths is None or (row_bags is not None and row_bags[i]) else v.index_select(0, job_of_row.to(v.device))
                      for i, (v, (_, _, lengths)) in enumerate(zip(read, batch.queries))]
            emb = (torch.stack(pooled, dim=1).float() if pooled
                   else torch.zeros(batch.job_rows.size, 0, cfg.embedding_dim))
            dense_t = None
            if dense is not None:
                dense_t = torch.from_numpy(dense)
                if row_bags is None:
                    dense_t = dense_t.index_select(0, job_of_row)
            probs = calibrator.probabilities(tower_logits(model, emb, dense_t, bf16)).numpy()
    ends = np.cumsum(batch.counts).tolist()  # slices: np.split costs ~10x more for a few jobs
    return [probs[start:end] for start, end in zip([0] + ends[:-1], ends)]


def score_examples(model: ServingModel, rows: ExampleRows, calibrator: Calibrator,
                   bf16: bool = False) -> np.ndarray:
    """Calibrated probabilities float32[B] for explicit rows; a slot not given is an empty bag."""
    cfg = model.tower.cfg
    empty = (np.zeros(0, np.int64), np.zeros(rows.size, np.int64))
    feeds = {slot: rows.sparse.get(slot, empty) for slot in cfg.slots}
    for slot in cfg.crosses:  # derived from its parts, never taken from the request
        a, b = (feeds[p] for p in cross_parts(slot))
        feeds[slot] = cross_bags(a[0], a[1], b[0], b[1])
    table = prefetched(model.table, {slot: values for slot, (values, _) in feeds.items()})
    with torch.no_grad():
        pooled = _read(table, [(slot, values, lengths) for slot, (values, lengths) in feeds.items()], cfg)
        emb = torch.stack(pooled, dim=1).float()
        dense = None
        if cfg.dense_dim:
            d = rows.dense if rows.dense is not None else np.zeros((rows.size, cfg.dense_dim), np.float32)
            dense = torch.from_numpy(np.ascontiguousarray(d, np.float32))
        return calibrator.probabilities(tower_logits(model, emb, dense, bf16)).numpy()


def _read(table: Any, queries: list[tuple[str, np.ndarray, np.ndarray | None]], cfg: Any) -> list[torch.Tensor]:
    """Every slot's lookup of one batch, each slot pooled as the model pools it
    (``cfg.pooling_of``): in one call where the table offers ``lookup_many`` (a local
    ``EmbeddingTable``), else one ``lookup`` / ``lookup_bags`` per slot (a remote table)."""
    modes = [cfg.pooling_of(slot) for slot, _, _ in queries]
    many = getattr(table, "lookup_many", None)
    if many is not None:
        return many(queries, mode=modes)
    return [table.lookup(slot, torch.from_numpy(ids)) if lengths is None
            else table.lookup_bags(slot, torch.from_numpy(ids), torch.from_numpy(lengths), mode=mode)
            for (slot, ids, lengths), mode in zip(queries, modes)]

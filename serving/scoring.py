"""Scoring with a replica: many ranking jobs, one vectorised model forward.

A :class:`RankJob` is one ``Recommend`` call: a user, its request-level sparse bags, optional
dense features and N candidate items. Request-level bags are pooled once per *job* and broadcast
to its candidates by index, so a batch of B jobs with N candidates in all costs B bag lookups per
context slot, one id lookup for the item slot and one tower forward over N rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from serving.calibration import Calibrator

__all__ = ["ServingModel", "RankJob", "score_jobs", "score_examples", "ExampleRows", "bf16_supported"]


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
    dense: np.ndarray | None = None  # float32[dense_dim] or None (zeros)


def bf16_supported() -> bool:
    """True when this CPU has native bfloat16 matmuls (AVX512-BF16 / AMX) for oneDNN."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _tower_logits(model: ServingModel, emb: torch.Tensor, dense: torch.Tensor | None,
                  bf16: bool = False) -> torch.Tensor:
    """Tower forward; with ``bf16`` the matmuls run in bfloat16 (fp32 accumulation) via autocast.

    On CPUs with native bf16 this is 2x (200 rows) to 4x (3200 rows) faster, and the gain grows
    with the batch, which is what micro-batching feeds it. Logits differ from fp32 by ~1e-3.
    """
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model.tower(emb, dense).float()


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


def score_jobs(model: ServingModel, jobs: Sequence[RankJob], calibrator: Calibrator,
               user_slot: str = "user_id", item_slot: str = "item_id", bf16: bool = False) -> list[np.ndarray]:
    """Calibrated click probabilities for every job's items (float32[N_j] per job)."""
    counts = np.fromiter((j.items.shape[0] for j in jobs), np.int64, len(jobs))
    total = int(counts.sum())
    job_of_row = torch.from_numpy(np.repeat(np.arange(len(jobs)), counts))
    user_ids = np.fromiter((j.user_id for j in jobs), np.int64, len(jobs))
    table, cfg = model.table, model.tower.cfg
    pooled = []
    with torch.no_grad():
        for slot in cfg.slots:
            if slot == item_slot:
                ids = torch.from_numpy(np.concatenate([j.items for j in jobs]).astype(np.int64, copy=False))
                pooled.append(table.lookup(slot, ids))
                continue
            ids, lengths = _job_bags(jobs, slot, user_ids if slot == user_slot else None)
            per_job = table.lookup_bags(slot, torch.from_numpy(ids), torch.from_numpy(lengths), mode=cfg.pooling)
            pooled.append(per_job.index_select(0, job_of_row))
        emb = torch.stack(pooled, dim=1).float() if pooled else torch.zeros(total, 0, cfg.embedding_dim)
        dense = None
        if cfg.dense_dim:
            per_job_dense = np.stack([np.zeros(cfg.dense_dim, np.float32) if j.dense is None
                                      else np.asarray(j.dense, np.float32) for j in jobs])
            dense = torch.from_numpy(per_job_dense).index_select(0, job_of_row)
        probs = calibrator.probabilities(_tower_logits(model, emb, dense, bf16)).numpy()
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
    pooled = []
    with torch.no_grad():
        for slot in cfg.slots:
            values, lengths = rows.sparse.get(slot, (np.zeros(0, np.int64), np.zeros(rows.size, np.int64)))
            pooled.append(model.table.lookup_bags(slot, torch.from_numpy(values),
                                                  torch.from_numpy(lengths), mode=cfg.pooling))
        emb = torch.stack(pooled, dim=1).float()
        dense = None
        if cfg.dense_dim:
            d = rows.dense if rows.dense is not None else np.zeros((rows.size, cfg.dense_dim), np.float32)
            dense = torch.from_numpy(np.ascontiguousarray(d, np.float32))
        return calibrator.probabilities(_tower_logits(model, emb, dense, bf16)).numpy()

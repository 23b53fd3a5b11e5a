"""Row-wise sharded lookup and gradient return across ranks (the way TorchRec's row-wise sharding does it).

Every rank holds the rows of the ids it owns (``shard_of(id, world) == rank``) in an ordinary
``EmbeddingTable``. Per mini-batch:

1. per slot, the batch's ids are made unique; all slots' unique ids are bucketed by owner;
2. ``all_to_all``: counts first, then ``(slot, id)`` pairs go to their owners;
3. owners look their ids up (``train=True`` creates rows for admitted ids, as in one process)
   and the vectors travel back along the reverse splits;
4. the requesting rank pools them into bags itself -- the pooled ``[B, S, D]`` leaf tensor is the
   same thing :func:`training.model.lookup_slots` returns in one process;
5. after backward, bag gradients are expanded to ids, summed per unique id, and return to the
   owners along the same splits; owners apply them with the table's own sparse optimizer
   (``apply_gradients`` sums the duplicates that arrive from several ranks first, exactly as it
   sums duplicates within one process's batch).

Only unique ids cross the wire, once each way; one exchange serves all slots. Admission counts:
an owner sees an id once per requesting rank rather than once per occurrence, which matters only
with ``admit_threshold > 1`` (admission then comes a little later than in one process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from embedding_store.sharding import shard_of
from training.distributed.exchange import ExchangeTimer, all_to_all_rows, exchange_counts
from training.model import SlotBags, bag_grads_to_ids

__all__ = ["RoutePlan", "ShardedEmbedding"]


@dataclass
class RoutePlan:
    """How one batch's ids were routed, kept to send the gradients back the same way."""

    lengths: list[torch.Tensor]  # per slot: int64[B]
    inverse: list[torch.Tensor]  # per slot: occurrence -> index into that slot's unique ids
    offsets: list[int]  # per slot: start of its unique ids in the concatenation
    order: torch.Tensor  # concatenation position of each sent row (owner-major send order)
    send_counts: list[int]
    recv_counts: list[int]
    recv_slot: np.ndarray  # slot index of every row this rank served as owner
    recv_ids: np.ndarray  # id of every row this rank served as owner
    by_slot: np.ndarray  # permutation grouping the served rows by slot (stable)
    unique_ids: int = 0
    sent_rows: int = 0


class ShardedEmbedding:
    """The sparse half of the model on one rank: its table shard plus the id exchange."""

    def __init__(self, table: Any, slots: Sequence[str], rank: int, world_size: int,
                 pooling: str = "sum", timer: ExchangeTimer | None = None) -> None:
        self.table, self.slots = table, tuple(slots)
        self.rank, self.world = rank, world_size
        self.pooling = pooling
        self.timer = timer or ExchangeTimer()
        dims = {table.slots[s].dim for s in self.slots}
        if len(dims) != 1:
            raise ValueError(f"sharded lookup needs one embedding dim for all slots, got {sorted(dims)}")
        self.dim = dims.pop()

    # -- exchange helpers (a world of one exchanges with itself: no collective at all) -------
    def _counts(self, send: list[int]) -> list[int]:
        if self.world == 1:
            return list(send)
        return exchange_counts(torch.tensor(send, dtype=torch.int64), self.timer).tolist()

    def _rows(self, rows: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        if self.world == 1:
            return rows
        return all_to_all_rows(rows, send, recv, self.timer)

    # -- forward ------------------------------------------------------------------------------
    def lookup(self, sparse: Mapping[str, Any], batch_size: int, train: bool = True,
               now: float | None = None) -> tuple[SlotBags, RoutePlan]:
        """Pooled bags ``[B, S, D]`` (a leaf tensor when ``train``) and the plan for :meth:`apply_gradients`."""
        uniq, inverse, lengths, all_ids = [], [], [], []
        for slot in self.slots:
            bag = sparse.get(slot)
            if bag is None:
                ids = np.zeros(0, np.int64)
                ln = torch.zeros(batch_size, dtype=torch.int64)
            else:
                ids = np.ascontiguousarray(bag.values, dtype=np.int64)
                ln = torch.from_numpy(np.ascontiguousarray(bag.lengths)).to(torch.int64)
                if ln.shape[0] != batch_size:
                    raise ValueError(f"slot {slot!r} has {ln.shape[0]} bags for {batch_size} rows")
            u, inv = np.unique(ids, return_inverse=True)
            uniq.append(u)
            inverse.append(torch.from_numpy(inv.reshape(-1).astype(np.int64)))
            lengths.append(ln)
            all_ids.append(ids)
        sizes = [u.size for u in uniq]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        cat_ids = np.concatenate(uniq) if uniq else np.zeros(0, np.int64)
        cat_slot = np.repeat(np.arange(len(self.slots), dtype=np.int64), sizes)
        owner = shard_of(cat_ids, self.world)
        order = np.argsort(owner, kind="stable")
        send = np.bincount(owner, minlength=self.world).tolist()
        recv = self._counts(send)
        pairs = torch.from_numpy(np.stack([cat_slot[order], cat_ids[order]], axis=1))
        got = self._rows(pairs, send, recv).numpy()
        recv_slot, recv_ids = got[:, 0].copy(), got[:, 1].copy()
        by_slot = np.argsort(recv_slot, kind="stable")
        served = self._serve(recv_slot, recv_ids, by_slot, train, now)
        back = self._rows(served, recv, send)
        vectors = torch.empty(cat_ids.size, self.dim)
        order_t = torch.from_numpy(order)
        vectors[order_t] = back
        pooled = []
        for s in range(len(self.slots)):
            occ = vectors[int(offsets[s]):int(offsets[s + 1])].index_select(0, inverse[s])
            pooled.append(self._pool(occ, lengths[s], batch_size))
        emb = (torch.stack(pooled, dim=1) if pooled else torch.zeros(batch_size, 0, 1)).contiguous()
        if train:
            emb.requires_grad_(True)
        plan = RoutePlan(lengths=lengths, inverse=inverse, offsets=offsets.tolist(), order=order_t,
                         send_counts=send, recv_counts=recv, recv_slot=recv_slot, recv_ids=recv_ids,
                         by_slot=by_slot,
                         unique_ids=int(cat_ids.size), sent_rows=int(cat_ids.size - send[self.rank]))
        return SlotBags(emb, [torch.from_numpy(i) for i in all_ids], lengths), plan

    def _serve(self, slot_idx: np.ndarray, ids: np.ndarray, by_slot: np.ndarray, train: bool,
               now: float | None) -> torch.Tensor:
        """The owner's side: vectors of the ``(slot, id)`` pairs the peers asked for.

        One table call per slot (rows from all peers together), so the table sees one batch
        per slot as it would in one process.
        """
        sorted_ids = ids[by_slot]
        vec = torch.empty(ids.size, self.dim)
        for s, start, stop in _slot_runs(slot_idx[by_slot]):
            kw: dict[str, Any] = {"train": train}
            if train and now is not None:
                kw["now"] = now
            vec[start:stop] = self.table.lookup(self.slots[s], torch.from_numpy(sorted_ids[start:stop]), **kw)
        out = torch.empty_like(vec)
        out[torch.from_numpy(by_slot)] = vec
        return out

    def _pool(self, occ: torch.Tensor, lengths: torch.Tensor, batch_size: int) -> torch.Tensor:
        bag = torch.repeat_interleave(torch.arange(batch_size), lengths)
        out = torch.zeros(batch_size, self.dim).index_add_(0, bag, occ)
        if self.pooling == "mean":
            out = out / lengths.clamp(min=1).to(out.dtype).unsqueeze(1)
        return out

    # -- backward -----------------------------------------------------------------------------
    def apply_gradients(self, plan: RoutePlan, emb_grad: torch.Tensor,
                        now: float | None = None) -> int:
        """Returns ``emb_grad`` ``[B, S, D]`` to the owners of the ids; owners step their rows.

        Returns the number of rows this rank updated as owner.
        """
        total = plan.offsets[-1]
        g_cat = torch.zeros(total, self.dim)
        for s in range(len(self.slots)):
            lo, hi = plan.offsets[s], plan.offsets[s + 1]
            if hi == lo:
                continue
            per_occ = bag_grads_to_ids(emb_grad[:, s], plan.lengths[s], self.pooling)
            g_cat[lo:hi].index_add_(0, plan.inverse[s], per_occ.to(torch.float32))
        got = self._rows(g_cat.index_select(0, plan.order), plan.send_counts, plan.recv_counts)
        # One optimizer call per slot with the rows of every peer: an id asked for by several
        # ranks gets its gradients summed before the (non-linear) Adagrad/FTRL/Adam step.
        perm = torch.from_numpy(plan.by_slot)
        got, ids = got.index_select(0, perm), plan.recv_ids[plan.by_slot]
        updated = 0
        for s, start, stop in _slot_runs(plan.recv_slot[plan.by_slot]):
            kw = {} if now is None else {"now": now}
            updated += self.table.apply_gradients(
                self.slots[s], torch.from_numpy(ids[start:stop]), got[start:stop], **kw)
        return updated


def _slot_runs(slot_idx: np.ndarray) -> list[tuple[int, int, int]]:
    """``(slot, start, stop)`` of each run of equal values in sorted ``slot_idx``."""
    if slot_idx.size == 0:
        return []
    change = np.flatnonzero(np.diff(slot_idx)) + 1
    starts = np.concatenate([[0], change])
    stops = np.concatenate([change, [slot_idx.size]])
    return [(int(slot_idx[a]), int(a), int(b)) for a, b in zip(starts, stops)]

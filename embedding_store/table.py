"""``EmbeddingTable``: the collisionless, expirable, multi-slot embedding table.

Every 64-bit id of a slot owns its own row (see :mod:`embedding_store.id_index`); memory is
bounded by admission (count-min sketch) and expiry (TTL, rows reused through a free list). Every
mutation batch bumps ``version`` and stamps the rows it touched, so ``export_delta`` can ship
exactly what changed since a version. One re-entrant lock guards the table: batches are large, so
the lock is taken once per batch, never per id.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

import embedding_store.kernels as kernels
from embedding_store.batched_read import read_many
from embedding_store.delta import SlotDelta, TableDelta
from embedding_store.id_index import take_rows
from embedding_store.optimizers import sparse_update
from embedding_store.persistence import load_table, save_table
from embedding_store.slot_store import SlotStore
from embedding_store.slots import SlotConfig
from embedding_store.split_batch import split_batch

log = logging.getLogger(__name__)

def _ids_np(ids: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        if ids.dtype != torch.int64:
            raise TypeError(f"ids must be int64, got {ids.dtype}")
        return ids.detach().reshape(-1).cpu().numpy()
    arr = np.asarray(ids)
    if arr.dtype != np.int64:
        raise TypeError(f"ids must be int64, got {arr.dtype}")
    return arr.reshape(-1)


class EmbeddingTable:
    """A table of feature slots mapping int64 ids to trainable vectors (see module docstring)."""

    def __init__(self, slots: Iterable[SlotConfig], device: str | torch.device = "cpu", seed: int = 0) -> None:
        self.slots: dict[str, SlotConfig] = {}
        for cfg in slots:
            if cfg.name in self.slots:
                raise ValueError(f"duplicate slot name {cfg.name!r}")
            self.slots[cfg.name] = cfg
        if not self.slots:
            raise ValueError("an EmbeddingTable needs at least one slot")
        self.device = torch.device(device)
        self.seed = seed
        self.version = 0
        self.lock = threading.RLock()
        self._stores = {
            name: SlotStore(cfg, self.device, seed=seed * 1_000_003 + i)
            for i, (name, cfg) in enumerate(self.slots.items())
        }
        self._expiry_thread: threading.Thread | None = None
        self._expiry_stop = threading.Event()
        self._last_saved: dict[str, object] = {}  # persistence bookkeeping per snapshot dir

    def add_slot(self, cfg: SlotConfig) -> None:
        """Adds an empty slot (a replica meeting rows of a slot its tower does not name)."""
        with self.lock:
            if cfg.name in self.slots:
                raise ValueError(f"duplicate slot name {cfg.name!r}")
            self.slots[cfg.name] = cfg
            self._stores[cfg.name] = SlotStore(cfg, self.device, seed=self.seed * 1_000_003 + len(self._stores))

    def _store(self, slot: str) -> SlotStore:
        try:
            return self._stores[slot]
        except KeyError:
            raise KeyError(f"unknown slot {slot!r}; table has {sorted(self._stores)}") from None

    # ---- reads / admission -------------------------------------------------------------------
    def _rows(self, st: SlotStore, ids: np.ndarray, train: bool, now: float | None) -> np.ndarray:
        """Row of each id; row 0 (the slot's default vector) for ids without one."""
        rows = st.index.find(ids, missing=0)
        if not train:
            return rows
        missing = rows == 0
        if not missing.any():
            return rows
        new_ids = ids[missing]
        if st.sketch is not None:
            est = st.sketch.add(new_ids)
            ok = est >= st.cfg.admit_threshold
            st.counters["rejected"] += int(np.unique(new_ids[~ok]).size)
            new_ids = new_ids[ok]
        uniq = np.unique(new_ids)
        if uniq.size:
            self.version += 1
            st.create(uniq, time.time() if now is None else now, self.version)
            st.counters["admitted"] += int(uniq.size)
            rows[missing] = st.index.find(ids[missing], missing=0)
        return rows

    def lookup(self, slot: str, ids: torch.Tensor, train: bool = False, now: float | None = None) -> torch.Tensor:
        """Vectors ``[n, dim]`` of ``ids``; unknown/unadmitted ids read the slot's default.

        ``train=True`` counts sightings and creates rows for newly admitted ids.
        """
        st = self._store(slot)
        ids_np = _ids_np(ids)
        with self.lock:
            if st.device.type != "cpu":
                rows = self._rows(st, ids_np, train, now)
                return st.values.index_select(0, torch.from_numpy(rows).to(st.device))
            if train:
                rows = self._rows(st, ids_np, train, now)  # may grow st.values: read it after
                return torch.from_numpy(take_rows(st.values.numpy(), rows))
            values = st.values.numpy()
            # Read-only: probe and copy in one compiled pass (row 0, the default, for unknown
            # ids); a large batch in chunks shared by two threads.
            out = np.empty((ids_np.size, st.cfg.dim), dtype=values.dtype)
            split_batch(lambda lo, hi: st.index.gather(ids_np[lo:hi], values, out[lo:hi], missing=0), ids_np.size)
            return torch.from_numpy(out)

    def lookup_bags(
        self,
        slot: str,
        ids: torch.Tensor,
        lengths: torch.Tensor | None = None,
        mode: str = "sum",
        train: bool = False,
        per_sample_weights: torch.Tensor | None = None,
        *,
        offsets: torch.Tensor | None = None,
        now: float | None = None,
    ) -> torch.Tensor:
        """Pooled vectors ``[num_bags, dim]`` over ragged bags given by ``lengths`` (or
        ``offsets``, length num_bags + 1). Empty bags pool to zeros. Fused Triton kernel on CUDA."""
        st = self._store(slot)
        ids_np = _ids_np(ids)
        offs = kernels.to_offsets(ids_np.size, lengths, offsets)
        with self.lock:
            rows = self._rows(st, ids_np, train, now)
            r = torch.from_numpy(rows).to(st.device)
            w = None if per_sample_weights is None else per_sample_weights.to(st.device, torch.float32)
            return kernels.embedding_bag(st.values, r, offs.to(st.device), mode, w)

    def lookup_many(self, queries: Sequence[tuple[str, np.ndarray, np.ndarray | None]],
                    mode: str | Sequence[str] = "sum") -> list[torch.Tensor]:
        """Several read-only lookups at once: per ``(slot, ids, lengths)``, what
        ``lookup(slot, ids)`` (``lengths`` None) or ``lookup_bags(slot, ids, lengths, mode)``
        returns, bit for bit; ``mode`` is one pooling for every query or one per query. On CPU
        the whole read is one TorchScript call (one GIL release, see
        :mod:`embedding_store.batched_read`): what a serving forward thread wants."""
        modes = [mode] * len(queries) if isinstance(mode, str) else list(mode)
        if len(modes) != len(queries):
            raise ValueError(f"{len(modes)} pooling modes for {len(queries)} queries")
        for m in modes:
            if m not in ("sum", "mean"):
                raise ValueError(f"mode must be 'sum' or 'mean', got {m!r}")
        # NumPy-side preparation only: every torch call here would release the GIL and queue to get it back.
        ids = [torch.from_numpy(_ids_np(q[1])) for q in queries]
        lengths = [None if q[2] is None else torch.from_numpy(np.ascontiguousarray(q[2], dtype=np.int64).reshape(-1))
                   for q in queries]
        with self.read_views([slot for slot, _, _ in queries]) as views:
            if views is None:
                return [self.lookup(slot, i) if n is None else self.lookup_bags(slot, i, n, mode=m)
                        for (slot, _, _), i, n, m in zip(queries, ids, lengths, modes)]
            try:
                return read_many(*views, ids, lengths, modes)
            except torch.jit.Error as exc:
                raise ValueError(str(exc).strip().splitlines()[-1].split(": ", 1)[-1]) from None

    @contextmanager
    def read_views(self, slots: Sequence[str]) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]] | None]:
        """Under the table's lock, per slot: the id index's probe table and the value rows, the
        inputs of :func:`embedding_store.batched_read.read_many`; None when a slot is off the CPU.

        For callers that fold the read into a larger compiled call (serving's batch forward).
        The views are only valid inside the ``with``: a writer may rebuild the index after it."""
        stores = [self._store(slot) for slot in slots]
        if any(st.device.type != "cpu" for st in stores):
            yield None
            return
        with self.lock:
            yield [st.index.table_view() for st in stores], [st.values for st in stores]

    # ---- writes ------------------------------------------------------------------------------
    def apply_gradients(self, slot: str, ids: torch.Tensor, grads: torch.Tensor, now: float | None = None) -> int:
        """One optimizer step on the rows of ``ids``; duplicate ids' grads are summed first.

        Ids without a row (never admitted, or expired) are skipped. Returns rows updated.
        """
        st = self._store(slot)
        ids_np = _ids_np(ids)
        if grads.shape != (ids_np.size, st.cfg.dim):
            raise ValueError(f"grads must be [{ids_np.size}, {st.cfg.dim}], got {tuple(grads.shape)}")
        if not bool(torch.isfinite(grads).all()):
            raise ValueError("grads contain NaN or inf; refusing to poison the rows")
        uniq, inv = np.unique(ids_np, return_inverse=True)
        g = torch.zeros(uniq.size, st.cfg.dim, device=st.device)
        g.index_add_(0, torch.from_numpy(inv).to(st.device), grads.detach().to(st.device, torch.float32))
        with self.lock:
            rows = st.index.find(uniq)
            has = rows >= 0
            if not has.all():
                rows, g = rows[has], g[torch.from_numpy(has).to(st.device)]
            if rows.size == 0:
                return 0
            r = torch.from_numpy(rows).to(st.device)
            k = st.cfg.weight_dim
            if st.cfg.optimizer == "adagrad" and not st.cfg.counter_columns and kernels.use_triton(st.values):
                kernels.adagrad_update(st.values, st.state["accum"], r, g, st.cfg.lr, st.cfg.eps)
            else:
                w = st.values.index_select(0, r)
                state = {n: t.index_select(0, r) for n, t in st.state.items()}
                # The optimizer sees only the weight columns; counter columns add their input.
                sparse_update(st.cfg, w[:, :k], {n: (t if t.dim() == 1 else t[:, :k])
                                                 for n, t in state.items()}, g[:, :k])
                if st.cfg.counter_columns:
                    w[:, k:] += g[:, k:]
                st.values.index_copy_(0, r, w)
                for n, t in st.state.items():
                    t.index_copy_(0, r, state[n])
            self.version += 1
            st.touched[rows] = time.time() if now is None else now
            st.row_version[rows] = self.version
        return int(rows.size)

    def apply_bag_gradients(
        self, slot: str, ids: torch.Tensor, lengths: torch.Tensor, bag_grads: torch.Tensor, mode: str = "sum",
        per_sample_weights: torch.Tensor | None = None, now: float | None = None,
    ) -> int:
        """Backward of :meth:`lookup_bags` plus the optimizer step: pooled-bag gradients
        ``[num_bags, dim]`` are expanded to their ids, then applied as in :meth:`apply_gradients`."""
        grads = kernels.bag_grads_to_ids(bag_grads, torch.as_tensor(lengths), mode, per_sample_weights)
        return self.apply_gradients(slot, ids, grads, now=now)

    # ---- expiry --------------------------------------------------------------------------------
    def expire(self, now: float | None = None) -> int:
        """Reclaim rows not updated within their slot's TTL; returns how many were dropped."""
        now = time.time() if now is None else now
        dropped = 0
        with self.lock:
            for st in self._stores.values():
                if st.cfg.ttl_s is None:
                    continue
                stale = np.flatnonzero(st.live & (st.touched < now - st.cfg.ttl_s))
                if stale.size == 0:
                    continue
                self.version += 1
                st.delete(st.ids[stale], self.version)
                st.counters["expired"] += int(stale.size)
                dropped += int(stale.size)
        if dropped:
            log.info("expired %d rows", dropped)
        return dropped

    def start_expiry(self, interval_s: float) -> None:
        """Run ``expire(time.time())`` every ``interval_s`` seconds on a daemon thread."""
        self.stop_expiry()
        self._expiry_stop.clear()

        def loop() -> None:
            while not self._expiry_stop.wait(interval_s):
                self.expire()

        self._expiry_thread = threading.Thread(target=loop, name="embedding-expiry", daemon=True)
        self._expiry_thread.start()

    def stop_expiry(self) -> None:
        if self._expiry_thread is not None:
            self._expiry_stop.set()
            self._expiry_thread.join()
            self._expiry_thread = None

    # ---- deltas ----------------------------------------------------------------------------------
    def export_delta(self, since_version: int, slots: Iterable[str] | None = None, with_state: bool = False) -> TableDelta:
        """Rows changed after ``since_version`` (values, optionally optimizer state) and ids
        deleted since then that are still absent now."""
        out: dict[str, SlotDelta] = {}
        with self.lock:
            for name in (self.slots if slots is None else slots):
                st = self._store(name)
                rows = np.flatnonzero(st.live & (st.row_version > since_version))
                r = torch.from_numpy(rows).to(st.device)
                dead = [ids for v, ids in st.deletions if v > since_version]
                deleted = np.unique(np.concatenate(dead)) if dead else np.zeros(0, np.int64)
                if deleted.size:
                    deleted = deleted[st.index.find(deleted) < 0]  # re-created since: an upsert
                state = {k: t.index_select(0, r).cpu() for k, t in st.state.items()} if with_state else None
                out[name] = SlotDelta(
                    ids=st.ids[rows].copy(), values=st.values.index_select(0, r).cpu(),
                    deleted_ids=deleted, state=state,
                )
            return TableDelta(from_version=since_version, to_version=self.version, slots=out)

    def import_delta(self, delta: TableDelta, now: float | None = None) -> None:
        """Apply a delta from another table: deletions, then upserts (state too when present)."""
        now = time.time() if now is None else now
        with self.lock:
            for name, sd in delta.slots.items():
                st = self._store(name)
                if sd.values.shape[1:] != (st.cfg.dim,) and sd.ids.size:
                    raise ValueError(f"delta slot {name}: dim {tuple(sd.values.shape)} != {st.cfg.dim}")
            self.version = max(self.version + 1, delta.to_version)
            for name, sd in delta.slots.items():
                st = self._store(name)
                if sd.deleted_ids.size:
                    st.delete(sd.deleted_ids.astype(np.int64), self.version)
                if sd.ids.size == 0:
                    continue
                rows = st.index.find(sd.ids)
                new = rows < 0
                if new.any():
                    rows[new] = st.create(sd.ids[new], now, self.version)
                r = torch.from_numpy(rows).to(st.device)
                st.values.index_copy_(0, r, sd.values.to(st.device, torch.float32))
                if sd.state:
                    for k, t in st.state.items():
                        if k in sd.state:
                            t.index_copy_(0, r, sd.state[k].to(st.device, t.dtype))
                st.touched[rows] = now
                st.row_version[rows] = self.version

    def compact_deletions(self, before_version: int) -> None:
        """Forget expiry records at or before ``before_version`` (every replica has them)."""
        with self.lock:
            for st in self._stores.values():
                st.deletions = [(v, ids) for v, ids in st.deletions if v > before_version]

    # ---- introspection -----------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, float]]:
        """Per slot: live rows, admitted/rejected/expired counts, bytes used, bytes per row."""
        out = {}
        with self.lock:
            for name, st in self._stores.items():
                live = st.live_rows
                used = st.bytes_used()
                out[name] = {
                    "live_rows": live,
                    "capacity_rows": st.capacity,
                    "free_rows": int(st.free.size),
                    "admitted": st.counters["admitted"],
                    "rejected": st.counters["rejected"],
                    "expired": st.counters["expired"],
                    "bytes_used": used,
                    "bytes_per_row": used / live if live else 0.0,
                    "raw_bytes_per_row": st.raw_bytes_per_row(),
                }
        return out

    def ids(self, slot: str) -> np.ndarray:
        """All live ids of a slot (row order)."""
        st = self._store(slot)
        with self.lock:
            return st.ids[st.live].copy()

    # ---- persistence (see embedding_store.persistence) ------------------------------------------
    def save(self, path: str, incremental: bool = True) -> dict:
        return save_table(self, path, incremental=incremental)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> "EmbeddingTable":
        return load_table(path, EmbeddingTable, device=device)

"""The rows of one slot: values, optimizer state and per-row metadata in flat arrays.

Row memory is a pool: ``allocate`` takes rows from the free list first (rows reclaimed by
expiry), then from the never-used tail, and grows the pool by a small factor (12.5%) so the
slack stays a small part of ``bytes_per_row``. Per-row metadata (id, last update time, version
of last change, live flag) lives in NumPy arrays beside the torch value/state tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from embedding_store.admission import CountMinSketch
from embedding_store.id_index import IdIndex
from embedding_store.optimizers import STATE_NAMES, initial_state_value, state_shapes
from embedding_store.slots import SlotConfig

GROWTH = 1.125


class SlotStore:
    """Storage of one slot; not thread-safe by itself (the table holds the lock)."""

    def __init__(self, cfg: SlotConfig, device: torch.device, seed: int, capacity: int = 64) -> None:
        self.cfg = cfg
        self.device = device
        self.index = IdIndex(capacity)
        self.sketch = CountMinSketch(cfg.sketch_width, cfg.sketch_depth) if cfg.admit_threshold > 1 else None
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.capacity = 0
        self.values = torch.empty(0, cfg.dim, device=device)
        self.state: dict[str, torch.Tensor] = {
            name: torch.empty((0, *shape), device=device) for name, shape in state_shapes(cfg).items()
        }
        self.ids = np.zeros(0, dtype=np.int64)
        self.live = np.zeros(0, dtype=bool)
        self.touched = np.zeros(0, dtype=np.float64)
        self.row_version = np.zeros(0, dtype=np.int64)
        self.free = np.zeros(0, dtype=np.int64)  # stack of reusable rows
        # Row 0 is reserved: it holds the slot's default vector, so unknown ids gather it in the
        # same index_select as everyone else (no masked fix-up pass). Never live, never freed.
        self.high = 1  # rows [1, high) have been handed out at least once
        self.deletions: list[tuple[int, np.ndarray]] = []  # (version, ids) expiry log for deltas
        self.counters = {"admitted": 0, "rejected": 0, "expired": 0}
        self._grow(capacity)
        self.values[0] = cfg.default_value

    # ---- memory ------------------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        if need <= self.capacity:
            return
        cap = max(need, int(self.capacity * GROWTH) + 1, 16)
        old = self.capacity

        def grow_t(t: torch.Tensor) -> torch.Tensor:
            new = torch.empty((cap, *t.shape[1:]), dtype=t.dtype, device=t.device)
            new[:old] = t
            new[old:] = 0  # zero only the tail: deterministic snapshots, one pass less
            return new

        def grow_a(a: np.ndarray) -> np.ndarray:
            new = np.zeros(cap, dtype=a.dtype)
            new[:old] = a
            return new

        self.values = grow_t(self.values)
        self.state = {k: grow_t(v) for k, v in self.state.items()}
        self.ids, self.live = grow_a(self.ids), grow_a(self.live)
        self.touched, self.row_version = grow_a(self.touched), grow_a(self.row_version)
        self.capacity = cap

    def allocate(self, n: int) -> np.ndarray:
        """``n`` free rows: reclaimed rows first (memory reuse), then fresh ones."""
        take = min(n, self.free.size)
        rows = self.free[self.free.size - take:][::-1].copy()
        self.free = self.free[: self.free.size - take]
        fresh = n - take
        if fresh:
            self._grow(self.high + fresh)
            rows = np.concatenate([rows, np.arange(self.high, self.high + fresh, dtype=np.int64)])
            self.high += fresh
        return rows

    def init_values(self, n: int) -> torch.Tensor:
        cfg = self.cfg
        if cfg.initializer == "zeros":
            vals = torch.zeros(n, cfg.dim)
        elif cfg.initializer == "uniform":
            vals = (torch.rand(n, cfg.dim, generator=self.generator) * 2 - 1) * cfg.init_std
        else:
            vals = torch.randn(n, cfg.dim, generator=self.generator) * cfg.init_std
        if cfg.counter_columns:
            vals[:, cfg.weight_dim:] = 0.0  # counters start from nothing seen
        return vals

    def create(self, ids: np.ndarray, now: float, version: int, values: torch.Tensor | None = None) -> np.ndarray:
        """Give distinct absent ``ids`` rows (fresh init + zero state); returns the rows."""
        rows = self.allocate(ids.size)
        r = torch.from_numpy(rows).to(self.device)
        vals = self.init_values(ids.size) if values is None else values
        self.values.index_copy_(0, r, vals.to(self.device, torch.float32))
        for name, t in self.state.items():
            t.index_fill_(0, r, initial_state_value(self.cfg, name))
        self.ids[rows] = ids
        self.live[rows] = True
        self.touched[rows] = now
        self.row_version[rows] = version
        self.index.insert(ids, rows)
        return rows

    def delete(self, ids: np.ndarray, version: int) -> np.ndarray:
        """Drop the rows of ``ids`` (absent ids ignored); rows go to the free list."""
        rows = self.index.remove(ids)
        rows = rows[rows >= 0]
        if rows.size:
            self.live[rows] = False
            self.row_version[rows] = version  # marks the row's snapshot block dirty
            self.free = np.concatenate([self.free, rows])
            self.deletions.append((version, self.ids[rows].copy()))
        return rows

    @property
    def default(self) -> torch.Tensor:
        return self.values[0]

    # ---- introspection ---------------------------------------------------------------------
    @property
    def live_rows(self) -> int:
        return len(self.index)

    def raw_bytes_per_row(self) -> int:
        per = self.values.element_size() * self.cfg.dim
        for t in self.state.values():
            per += t.element_size() * (t[0].numel() if t.dim() > 1 else 1)
        return per

    def bytes_used(self) -> int:
        """Everything this slot allocated: rows incl. slack, state, metadata, index, sketch."""
        total = self.values.element_size() * self.values.numel()
        total += sum(t.element_size() * t.numel() for t in self.state.values())
        total += self.ids.nbytes + self.live.nbytes + self.touched.nbytes + self.row_version.nbytes
        total += self.free.nbytes + self.index.nbytes
        if self.sketch is not None:
            total += self.sketch.nbytes
        return int(total)

    def state_names(self) -> tuple[str, ...]:
        return STATE_NAMES[self.cfg.optimizer]

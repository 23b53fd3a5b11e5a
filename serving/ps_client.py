"""The recommender's side of sharded parameter servers: one lookup fanned out to every shard.

The embedding source interface the recommender scores with is the read API of
``embedding_store.EmbeddingTable``: ``slots``, ``lookup(slot, ids)`` and
``lookup_bags(slot, ids, lengths, mode)``. The local source is the table itself (today's
``--role all``); :class:`RemoteTable` is the sharded one, so :mod:`serving.scoring` and
:mod:`serving.recommender` need no change to use it.

A lookup de-duplicates the ids, splits them by :func:`embedding_store.sharding.shard_of` (the one
placement rule, shared with the trainer's publisher) and sends one ``ParameterServer.Lookup`` per
shard, all in flight at once, with one deadline. Scoring asks for every slot of a micro-batch up
front (:meth:`RemoteTable.prefetch`), so a batch costs ONE multi-slot Lookup per shard, not one
fan-out per slot one after another; the per-slot ``lookup``/``lookup_bags`` are then served from
the prefetched rows. A shard that errs, is down or misses the deadline
costs only its ids: they read the slot's default vector (what an unknown id reads anyway), the
metric ``hw_serve_ps_degraded_total{shard,reason}`` counts it and a warning is logged (at most
once per shard every few seconds). Bags are pooled here, with the store's own ``embedding_bag``, so
the scores equal those of one unsharded table over the same parameters.

:class:`ShardedModelSource` is the recommender replica's model: the tower from the control
partition of ``hw.params`` (a :class:`~serving.param_server.ParamServer` reading no rows) plus a
:class:`RemoteTable` over the shards.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import grpc
import numpy as np
import torch
from prometheus_client import Counter

from embedding_store import kernels
from embedding_store.sharding import shard_of
from serving.pb import pb2, pb2_grpc
from serving.scoring import ServingModel

log = logging.getLogger(__name__)

__all__ = ["PsClientConfig", "ShardFleet", "RemoteTable", "ShardedModelSource", "DEGRADED"]

DEGRADED = Counter("hw_serve_ps_degraded", "shard lookups answered with default vectors instead",
                   ["shard", "reason"])
FANOUT_CALLS = Counter("hw_serve_ps_fanout_calls", "ParameterServer.Lookup calls this recommender sent",
                       ["shard"])
_LOG_EVERY_S = 5.0


@dataclass
class PsClientConfig:
    """Which parameter-server shards a recommender replica asks, and how long it waits."""

    ps: str = field(default="", metadata={"help": "--role recommender: PS shard addresses host:port,... in shard order"})
    ps_deadline_ms: float = field(default=50.0, metadata={"help": "deadline of one fanned-out lookup; late shards read default vectors"})
    ps_batch_slots: bool = field(default=True, metadata={"help": "one multi-slot Lookup per shard per micro-batch; "
                                                                 "off: one fan-out per slot (the old path, a benchmark baseline)"})

    def addresses(self) -> list[str]:
        out = [a.strip() for a in self.ps.split(",") if a.strip()]
        if not out:
            raise ValueError("--role recommender needs --ps host:port[,host:port...] (one per shard, in shard order)")
        return out


class _BadAnswer(Exception):
    """A shard answered, but not what was asked (wrong shard, slot, dim or length)."""


class ShardFleet:
    """Channels to the N shards (index = shard) and their last reported version / watermark."""

    def __init__(self, addresses: list[str], deadline_s: float = 0.05, batch_slots: bool = True) -> None:
        if not addresses:
            raise ValueError("a shard fleet needs at least one address")
        self.addresses = list(addresses)
        self.deadline_s = deadline_s
        self.batch_slots = batch_slots
        self.channels = [grpc.insecure_channel(a) for a in self.addresses]
        self.stubs = [pb2_grpc.ParameterServerStub(c) for c in self.channels]
        self.versions = np.full(len(addresses), -1, np.int64)
        self.watermarks = np.full(len(addresses), -1, np.int64)
        self.calls = np.zeros(len(addresses), np.int64)  # Lookup RPCs sent, per shard
        self._calls_metric = [FANOUT_CALLS.labels(shard=str(s)) for s in range(len(addresses))]
        self._last_log = np.full(len(addresses), -np.inf)
        self._lock = threading.Lock()

    @property
    def num_shards(self) -> int:
        return len(self.addresses)

    def close(self) -> None:
        for c in self.channels:
            c.close()

    def version(self) -> int:
        """The oldest version any shard reported (-1 until every shard answered once)."""
        return int(self.versions.min())

    def watermark_ms(self) -> int:
        return int(self.watermarks.min())

    def fetch(self, slot: str, ids: np.ndarray, defaults: Any) -> np.ndarray:
        """float32[len(ids), dim]: every id's row from its shard, or ``defaults``' row on failure.

        ``defaults`` is a table with the slot (the control replica's empty table): what it reads
        for an id is the slot's default vector.
        """
        uniq, inv = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)
        return self.fetch_unique({slot: uniq}, defaults)[slot][inv]

    def fetch_unique(self, wanted: Mapping[str, np.ndarray], defaults: Any) -> dict[str, np.ndarray]:
        """Per slot float32[len(ids), dim] for unique ids of many slots, in one round trip.

        Each shard gets ONE ``Lookup`` carrying its ids of every slot; all are in flight before
        any is waited on, under one deadline. A shard that fails costs its ids of every slot
        (default vectors) and counts once in ``hw_serve_ps_degraded_total``.
        """
        n = self.num_shards
        out = {slot: np.empty((ids.size, int(defaults.slots[slot].dim)), np.float32) for slot, ids in wanted.items()}
        owners = {slot: shard_of(ids, n) for slot, ids in wanted.items() if ids.size}
        calls = []
        for s in range(n):  # all calls in flight before waiting on any
            req, asked = pb2.LookupRequest(), []
            for slot, owner in owners.items():
                sel = np.flatnonzero(owner == s)
                if sel.size:
                    req.slots.add(slot=slot, ids=wanted[slot][sel].tolist())
                    asked.append((slot, sel))
            if asked:
                calls.append((s, asked, self.stubs[s].Lookup.future(req, timeout=self.deadline_s)))
                self._calls_metric[s].inc()
        with self._lock:
            for s, _, _ in calls:
                self.calls[s] += 1
        for s, asked, fut in calls:
            try:
                for (slot, sel), rows in zip(asked, self._rows(s, fut.result(), asked, out)):
                    out[slot][sel] = rows
            except (grpc.RpcError, _BadAnswer) as exc:
                reason = exc.code().name if isinstance(exc, grpc.RpcError) else "BAD_ANSWER"
                self._degraded(s, reason, exc)
                for slot, sel in asked:
                    out[slot][sel] = defaults.lookup(slot, torch.from_numpy(wanted[slot][sel])).numpy()
        return out

    def _rows(self, shard: int, resp: Any, asked: list[tuple[str, np.ndarray]],
              out: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The answer's rows per asked slot, after checking all of it (a bad answer changes nothing)."""
        if resp.shard_index != shard or resp.num_shards != self.num_shards:
            raise _BadAnswer(f"{self.addresses[shard]} is shard {resp.shard_index}/{resp.num_shards}, "
                             f"expected {shard}/{self.num_shards} (is --ps in shard order?)")
        if len(resp.slots) != len(asked):
            raise _BadAnswer(f"shard {shard} answered {len(resp.slots)} slots, asked {len(asked)}")
        rows = []
        for (slot, sel), got in zip(asked, resp.slots):
            dim = out[slot].shape[1]
            if got.slot != slot or got.dim != dim or len(got.values) != sel.size * dim * 4:
                raise _BadAnswer(f"shard {shard} answered a different slot, dim or row count")
            rows.append(np.frombuffer(got.values, dtype="<f4").reshape(sel.size, dim))
        with self._lock:
            self.versions[shard] = resp.version
            self.watermarks[shard] = resp.watermark_ms
        return rows

    def _degraded(self, shard: int, reason: str, exc: Exception) -> None:
        DEGRADED.labels(shard=str(shard), reason=reason).inc()
        now = time.monotonic()
        if now - self._last_log[shard] >= _LOG_EVERY_S:
            self._last_log[shard] = now
            detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            log.warning("PS shard %d (%s) degraded to default vectors: %s %s", shard,
                        self.addresses[shard], reason, detail)


class RemoteTable:
    """The sharded embedding source: ``EmbeddingTable``'s read API over a :class:`ShardFleet`.

    A table made by :meth:`prefetch` also holds prefetched rows (per slot: sorted unique ids and
    their rows) and answers ids among them without a round trip.
    """

    def __init__(self, fleet: ShardFleet, defaults: Any,
                 cached: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        self.fleet = fleet
        self.defaults = defaults
        self.slots = defaults.slots
        self.cached = dict(cached or {})

    def prefetch(self, wanted: Mapping[str, Any]) -> "RemoteTable":
        """A view of this table with every slot's ``wanted`` ids fetched in one fan-out.

        Scoring calls this once per micro-batch with all the ids it will look up; with
        ``fleet.batch_slots`` off it returns ``self`` (one fan-out per lookup, as before).
        """
        if not self.fleet.batch_slots:
            return self
        uniq = {slot: np.unique(_np_ids(ids)) for slot, ids in wanted.items()}
        rows = self.fleet.fetch_unique(uniq, self.defaults)
        return RemoteTable(self.fleet, self.defaults, {slot: (uniq[slot], rows[slot]) for slot in uniq})

    def _positions(self, slot: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows, index of each id in rows) from the prefetched rows, or None if some id is not there."""
        hit = self.cached.get(slot)
        if hit is None:
            return None
        known, rows = hit
        if ids.size == 0:
            return rows, np.zeros(0, np.int64)
        pos = np.searchsorted(known, ids)
        if pos.max() >= known.size or not np.array_equal(known[pos], ids):
            return None
        return rows, pos

    def lookup(self, slot: str, ids: torch.Tensor, train: bool = False, now: float | None = None) -> torch.Tensor:
        if train:
            raise ValueError("a remote table is read-only")
        ids_np = _np_ids(ids)
        hit = self._positions(slot, ids_np)
        if hit is not None:
            return torch.from_numpy(hit[0][hit[1]])
        return torch.from_numpy(self.fleet.fetch(slot, ids_np, self.defaults))

    def lookup_bags(self, slot: str, ids: torch.Tensor, lengths: torch.Tensor | None = None,
                    mode: str = "sum", train: bool = False, per_sample_weights: torch.Tensor | None = None,
                    *, offsets: torch.Tensor | None = None, now: float | None = None) -> torch.Tensor:
        """Pooled bags, pooled here from the fetched rows by the store's own kernel."""
        if train:
            raise ValueError("a remote table is read-only")
        ids_np = _np_ids(ids)
        offs = kernels.to_offsets(ids_np.size, lengths, offsets)
        hit = self._positions(slot, ids_np)
        if hit is None:
            uniq, inv = np.unique(ids_np, return_inverse=True)
            hit = (self.fleet.fetch(slot, uniq, self.defaults), inv)
        w = None if per_sample_weights is None else per_sample_weights.to(torch.float32)
        return kernels.embedding_bag(torch.from_numpy(hit[0]), torch.from_numpy(hit[1].astype(np.int64)), offs, mode, w)

    def ids(self, slot: str) -> np.ndarray:
        raise NotImplementedError("the rows live on the PS shards; a recommender replica cannot list "
                                  "them (GetEmbeddings `known` and retrieval need --role all)")

    def export_delta(self, *args: Any, **kw: Any) -> Any:
        raise NotImplementedError("retrieval needs the item rows locally: with --role recommender "
                                  "send candidate_item_ids")


class ShardedModelSource:
    """A recommender replica's model source: control-partition tower + rows from the shards."""

    def __init__(self, control: Any, fleet: ShardFleet) -> None:
        self.control = control  # a ParamServer on the control partition
        self.fleet = fleet

    @property
    def ready(self) -> bool:
        return bool(self.control.ready)

    def current(self) -> ServingModel | None:
        base = self.control.current()
        if base is None:
            return None
        version = self.fleet.version()
        watermark = self.fleet.watermark_ms()
        return ServingModel(base.model_id, RemoteTable(self.fleet, base.table), base.tower,
                            version if version >= 0 else base.version,
                            watermark if watermark >= 0 else base.watermark_ms)

    def freshness_lag_ms(self, now_ms: int | None = None) -> int:
        wm = self.fleet.watermark_ms()
        if wm < 0:
            return self.control.freshness_lag_ms(now_ms)
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return max(now_ms - wm, 0)


def _np_ids(ids: Any) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        return ids.detach().cpu().numpy().astype(np.int64, copy=False)
    return np.asarray(ids, dtype=np.int64)

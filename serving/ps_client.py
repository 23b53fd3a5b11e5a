"""The recommender's side of sharded parameter servers: one lookup fanned out to every shard.

The embedding source interface the recommender scores with is the read API of
``embedding_store.EmbeddingTable``: ``slots``, ``lookup(slot, ids)`` and
``lookup_bags(slot, ids, lengths, mode)``. The local source is the table itself (today's
``--role all``); :class:`RemoteTable` is the sharded one, so :mod:`serving.scoring` and
:mod:`serving.recommender` need no change to use it.

A lookup de-duplicates the ids, splits them by :func:`embedding_store.sharding.shard_of` (the one
placement rule, shared with the trainer's publisher) and sends one ``ParameterServer.Lookup`` per
shard, all in flight at once, with one deadline. A shard that errs, is down or misses the deadline
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
from typing import Any

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
_LOG_EVERY_S = 5.0


@dataclass
class PsClientConfig:
    """Which parameter-server shards a recommender replica asks, and how long it waits."""

    ps: str = field(default="", metadata={"help": "--role recommender: PS shard addresses host:port,... in shard order"})
    ps_deadline_ms: float = field(default=50.0, metadata={"help": "deadline of one fanned-out lookup; late shards read default vectors"})

    def addresses(self) -> list[str]:
        out = [a.strip() for a in self.ps.split(",") if a.strip()]
        if not out:
            raise ValueError("--role recommender needs --ps host:port[,host:port...] (one per shard, in shard order)")
        return out


class _BadAnswer(Exception):
    """A shard answered, but not what was asked (wrong shard, slot, dim or length)."""


class ShardFleet:
    """Channels to the N shards (index = shard) and their last reported version / watermark."""

    def __init__(self, addresses: list[str], deadline_s: float = 0.05) -> None:
        if not addresses:
            raise ValueError("a shard fleet needs at least one address")
        self.addresses = list(addresses)
        self.deadline_s = deadline_s
        self.channels = [grpc.insecure_channel(a) for a in self.addresses]
        self.stubs = [pb2_grpc.ParameterServerStub(c) for c in self.channels]
        self.versions = np.full(len(addresses), -1, np.int64)
        self.watermarks = np.full(len(addresses), -1, np.int64)
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
        ids = np.asarray(ids, dtype=np.int64)
        dim = int(defaults.slots[slot].dim)
        uniq, inv = np.unique(ids, return_inverse=True)
        out = np.empty((uniq.size, dim), np.float32)
        owner = shard_of(uniq, self.num_shards)
        calls = []
        for s in range(self.num_shards):  # all calls in flight before waiting on any
            sel = np.flatnonzero(owner == s)
            if sel.size:
                req = pb2.LookupRequest()
                req.slots.add(slot=slot, ids=uniq[sel].tolist())
                calls.append((s, sel, self.stubs[s].Lookup.future(req, timeout=self.deadline_s)))
        for s, sel, fut in calls:
            try:
                out[sel] = self._rows(s, fut.result(), slot, sel.size, dim)
            except (grpc.RpcError, _BadAnswer) as exc:
                reason = exc.code().name if isinstance(exc, grpc.RpcError) else "BAD_ANSWER"
                self._degraded(s, reason, exc)
                out[sel] = defaults.lookup(slot, torch.from_numpy(uniq[sel])).numpy()
        return out[inv]

    def _rows(self, shard: int, resp: Any, slot: str, n: int, dim: int) -> np.ndarray:
        if resp.shard_index != shard or resp.num_shards != self.num_shards:
            raise _BadAnswer(f"{self.addresses[shard]} is shard {resp.shard_index}/{resp.num_shards}, "
                             f"expected {shard}/{self.num_shards} (is --ps in shard order?)")
        if len(resp.slots) != 1 or resp.slots[0].slot != slot or resp.slots[0].dim != dim \
                or len(resp.slots[0].values) != n * dim * 4:
            raise _BadAnswer(f"shard {shard} answered a different slot, dim or row count")
        with self._lock:
            self.versions[shard] = resp.version
            self.watermarks[shard] = resp.watermark_ms
        return np.frombuffer(resp.slots[0].values, dtype="<f4").reshape(n, dim)

    def _degraded(self, shard: int, reason: str, exc: Exception) -> None:
        DEGRADED.labels(shard=str(shard), reason=reason).inc()
        now = time.monotonic()
        if now - self._last_log[shard] >= _LOG_EVERY_S:
            self._last_log[shard] = now
            detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            log.warning("PS shard %d (%s) degraded to default vectors: %s %s", shard,
                        self.addresses[shard], reason, detail)


class RemoteTable:
    """The sharded embedding source: ``EmbeddingTable``'s read API over a :class:`ShardFleet`."""

    def __init__(self, fleet: ShardFleet, defaults: Any) -> None:
        self.fleet = fleet
        self.defaults = defaults
        self.slots = defaults.slots

    def lookup(self, slot: str, ids: torch.Tensor, train: bool = False, now: float | None = None) -> torch.Tensor:
        if train:
            raise ValueError("a remote table is read-only")
        return torch.from_numpy(self.fleet.fetch(slot, _np_ids(ids), self.defaults))

    def lookup_bags(self, slot: str, ids: torch.Tensor, lengths: torch.Tensor | None = None,
                    mode: str = "sum", train: bool = False, per_sample_weights: torch.Tensor | None = None,
                    *, offsets: torch.Tensor | None = None, now: float | None = None) -> torch.Tensor:
        """Pooled bags, pooled here from the fetched rows by the store's own kernel."""
        if train:
            raise ValueError("a remote table is read-only")
        ids_np = _np_ids(ids)
        offs = kernels.to_offsets(ids_np.size, lengths, offsets)
        uniq, inv = np.unique(ids_np, return_inverse=True)
        rows = torch.from_numpy(self.fleet.fetch(slot, uniq, self.defaults))
        w = None if per_sample_weights is None else per_sample_weights.to(torch.float32)
        return kernels.embedding_bag(rows, torch.from_numpy(inv.astype(np.int64)), offs, mode, w)

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

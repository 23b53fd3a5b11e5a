"""The recommender's side of sharded parameter servers: one lookup fanned out to every shard.

A lookup de-duplicates the ids, splits them by :func:`embedding_store.sharding.shard_of` (the one
placement rule, shared with the trainer's publisher) and sends one ``ParameterServer.Lookup`` per
shard, all in flight at once, with one deadline. Many slots' ids go in one call
(:meth:`ShardFleet.fetch_unique`): scoring asks for every slot of a micro-batch up front, so a
batch costs ONE multi-slot Lookup per shard, not one fan-out per slot one after another. A shard
that errs, is down or misses the deadline costs only its ids: they read the slot's default vector
(what an unknown id reads anyway), the metric ``hw_serve_ps_degraded_total{shard,reason}`` counts
it and a warning is logged (at most once per shard every few seconds).

The two calls that need more than rows also work over the fleet, with the answers of one
unsharded table. ``GetEmbeddings`` reads rows and ``known`` flags in one fan-out
(:meth:`ShardFleet.fetch_known`); unlike scoring it does not degrade: a shard that does not
answer fails the call with :class:`ShardsUnavailable` (UNAVAILABLE), because default vectors
flagged "unknown" would read as a true answer. Retrieval (``Recommend`` without candidates) runs
on the shards: each returns the top k of its own items for the query (``ParameterServer.Retrieve``)
and :meth:`ShardFleet.retrieve` merges them, so no replica copies every item row and the result
is as fresh as the shards. A shard that fails costs only its items; if none answers, the call is
UNAVAILABLE.

What scoring reads through the fleet is :class:`serving.remote_table.RemoteTable`.
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

from embedding_store.sharding import shard_of
from serving.pb import pb2, pb2_grpc

log = logging.getLogger(__name__)

__all__ = ["PsClientConfig", "ShardFleet", "ShardsUnavailable", "DEGRADED"]

DEGRADED = Counter("hw_serve_ps_degraded", "shard calls answered without that shard "
                   "(its ids read default vectors, or its items sit out a retrieval)", ["shard", "reason"])
FANOUT_CALLS = Counter("hw_serve_ps_fanout_calls", "ParameterServer.Lookup calls this recommender sent",
                       ["shard"])
_LOG_EVERY_S = 5.0
RETRIEVE_DEADLINE_S = 1.0  # a shard's first Retrieve builds its item index: longer than a Lookup


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


class ShardsUnavailable(Exception):
    """Shards a call cannot do without did not answer (the recommender maps it to UNAVAILABLE)."""


class ShardFleet:
    """Channels to the N shards (index = shard) and their last reported version / watermark."""

    def __init__(self, addresses: list[str], deadline_s: float = 0.05, batch_slots: bool = True) -> None:
        if not addresses:
            raise ValueError("a shard fleet needs at least one address")
        self.addresses = list(addresses)
        self.deadline_s = deadline_s
        self.retrieve_deadline_s = max(deadline_s, RETRIEVE_DEADLINE_S)
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
        out = self._out(wanted, defaults)
        for s, asked, answer in self._lookup(wanted, out, with_known=False):
            if isinstance(answer, Exception):
                for slot, sel in asked:
                    out[slot][sel] = defaults.lookup(slot, torch.from_numpy(wanted[slot][sel])).numpy()
        return out

    def fetch_known(self, slot: str, ids: np.ndarray, defaults: Any) -> tuple[np.ndarray, np.ndarray]:
        """(float32[len(ids), dim] rows, bool[len(ids)] held by a shard) of any ids, in one fan-out.

        Raises :class:`ShardsUnavailable` if a shard holding some of the ids does not answer.
        """
        uniq, inv = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)
        wanted = {slot: uniq}
        out = self._out(wanted, defaults)
        known = np.zeros(uniq.size, bool)
        failed = []
        for s, asked, answer in self._lookup(wanted, out, with_known=True):
            if isinstance(answer, Exception):
                failed.append(_failure(self.addresses, s, answer))
            else:
                for (_, sel), flags in zip(asked, answer):
                    known[sel] = flags
        if failed:
            raise ShardsUnavailable("parameter-server shards did not answer: " + "; ".join(failed))
        return out[slot][inv], known[inv]

    @staticmethod
    def _out(wanted: Mapping[str, np.ndarray], defaults: Any) -> dict[str, np.ndarray]:
        return {slot: np.empty((ids.size, int(defaults.slots[slot].dim)), np.float32) for slot, ids in wanted.items()}

    def _lookup(self, wanted: Mapping[str, np.ndarray], out: dict[str, np.ndarray], with_known: bool
                ) -> list[tuple[int, list[tuple[str, np.ndarray]], Any]]:
        """One ``Lookup`` per shard that owns some ids, all in flight at once; writes the rows that
        came back into ``out``. Per shard: (shard, [(slot, positions asked)], known flags per asked
        slot, or the exception that shard's call ended with, already counted and logged)."""
        n = self.num_shards
        owners = {slot: shard_of(ids, n) for slot, ids in wanted.items() if ids.size}
        calls = []
        for s in range(n):  # all calls in flight before waiting on any
            req, asked = pb2.LookupRequest(with_known=with_known), []
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
        results = []
        for s, asked, fut in calls:
            try:
                rows, known = self._rows(s, fut.result(), asked, out, with_known)
                for (slot, sel), r in zip(asked, rows):
                    out[slot][sel] = r
                results.append((s, asked, known))
            except (grpc.RpcError, _BadAnswer) as exc:
                self._degraded(s, _reason(exc), exc)
                results.append((s, asked, exc))
        return results

    def _rows(self, shard: int, resp: Any, asked: list[tuple[str, np.ndarray]],
              out: dict[str, np.ndarray], with_known: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The answer's rows (and known flags) per asked slot, after checking all of it (a bad
        answer changes nothing)."""
        self._check_shard(shard, resp)
        if len(resp.slots) != len(asked):
            raise _BadAnswer(f"shard {shard} answered {len(resp.slots)} slots, asked {len(asked)}")
        rows, known = [], []
        for (slot, sel), got in zip(asked, resp.slots):
            dim = out[slot].shape[1]
            if got.slot != slot or got.dim != dim or len(got.values) != sel.size * dim * 4:
                raise _BadAnswer(f"shard {shard} answered a different slot, dim or row count")
            if with_known and len(got.known) != sel.size:
                raise _BadAnswer(f"shard {shard} answered without known flags (an older shard?)")
            rows.append(np.frombuffer(got.values, dtype="<f4").reshape(sel.size, dim))
            known.append(np.frombuffer(got.known, dtype=np.uint8).astype(bool))
        self._seen(shard, resp)
        return rows, known

    def retrieve(self, slot: str, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` items of ``slot`` with the largest ``<query, row>`` over all shards (score desc,
        then id asc) and their scores: every shard's own top k, merged.

        A shard that fails costs only its items (counted and logged like a failed Lookup); if no
        shard answers, :class:`ShardsUnavailable`.
        """
        req = pb2.RetrieveRequest(slot=slot, query=np.asarray(query, np.float32).reshape(-1).tolist(), k=k)
        futs = [stub.Retrieve.future(req, timeout=self.retrieve_deadline_s) for stub in self.stubs]
        ids, scores, failed = [], [], []
        for s, fut in enumerate(futs):
            try:
                resp = fut.result()
                self._check_shard(s, resp)
                got = np.asarray(resp.ids, np.int64)
                if len(resp.scores) != got.size or got.size > k or (shard_of(got, self.num_shards) != s).any():
                    raise _BadAnswer(f"shard {s} answered items it does not hold, or more than asked")
                ids.append(got)
                scores.append(np.asarray(resp.scores, np.float32))
                self._seen(s, resp)
            except (grpc.RpcError, _BadAnswer) as exc:
                self._degraded(s, _reason(exc), exc)
                failed.append(_failure(self.addresses, s, exc))
        if len(failed) == self.num_shards:
            raise ShardsUnavailable("no parameter-server shard answered the retrieval: " + "; ".join(failed))
        all_ids, all_scores = np.concatenate(ids), np.concatenate(scores)
        order = np.lexsort((all_ids, -all_scores))[:k]
        return all_ids[order], all_scores[order]

    def _check_shard(self, shard: int, resp: Any) -> None:
        if resp.shard_index != shard or resp.num_shards != self.num_shards:
            raise _BadAnswer(f"{self.addresses[shard]} is shard {resp.shard_index}/{resp.num_shards}, "
                             f"expected {shard}/{self.num_shards} (is --ps in shard order?)")

    def _seen(self, shard: int, resp: Any) -> None:
        with self._lock:
            self.versions[shard] = resp.version
            self.watermarks[shard] = resp.watermark_ms

    def _degraded(self, shard: int, reason: str, exc: Exception) -> None:
        DEGRADED.labels(shard=str(shard), reason=reason).inc()
        now = time.monotonic()
        if now - self._last_log[shard] >= _LOG_EVERY_S:
            self._last_log[shard] = now
            detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            log.warning("PS shard %d (%s) degraded to default vectors: %s %s", shard,
                        self.addresses[shard], reason, detail)


def _reason(exc: Exception) -> str:
    return exc.code().name if isinstance(exc, grpc.RpcError) else "BAD_ANSWER"


def _failure(addresses: list[str], shard: int, exc: Exception) -> str:
    detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
    return f"shard {shard} ({addresses[shard]}): {_reason(exc)} {detail}"

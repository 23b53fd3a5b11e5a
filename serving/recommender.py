"""``headwater.v1.Recommender``: request validation, retrieval, batched ranking, responses.

Each method maps failures to gRPC codes: malformed input (a bad field, or bytes that are not a
protobuf message) -> INVALID_ARGUMENT naming the field, no model yet or no parameter-server shard
answering -> UNAVAILABLE, queue full -> RESOURCE_EXHAUSTED, deadline passed -> DEADLINE_EXCEEDED.

Every method works in both layouts: over the one-process replica table (``--role all``) and over
the PS shards (``--role recommender``, a :class:`~serving.remote_table.RemoteTable`), with the same
answers. Where the sharded table offers its own way (``retrieve``: top k searched on the shards;
``lookup_known``: rows and ``known`` flags in one fan-out) the service uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor, TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Callable

import grpc
import numpy as np
import torch

from batching import Arbiter, Priority
from paramsync.retrieval_slots import ITEM_VECTORS, USER_VECTORS
from serving import metrics as m
from serving.calibration import Calibrator
from serving.ann_retrieval import ItemRetriever, Retrieved
from serving.config import ServeConfig
from serving.microbatch import DeadlineExpired, MicroBatcher, Overloaded
from serving.pb import pb2, pb2_grpc
from serving.recent_items import fill_recent_items
from serving.response_wire import encode_recommend_response
from serving.rpc_guard import MalformedRequest
from serving.scoring import ItemSource, RankJob, ServingModel, item_dense_width, score_examples, score_jobs
from serving.shard_fleet import ShardsUnavailable
from serving.validation import InvalidRequest, Limits, embedding_ids, example_rows, rank_job, retrieval_args
from training.model import bf16_supported

if TYPE_CHECKING:  # the rerank stage (and the LLM engine under it) loads only with --llm
    from serving.rerank import RerankStage
    from serving.user_history import UserHistory

log = logging.getLogger(__name__)

__all__ = ["RecommenderService", "ServiceError", "top_order"]

# candidate_source of a call that brought its candidates: appended to the encoded response
# (a message's fields may come in any order on the wire; a later field merges into the message)
_FROM_REQUEST = pb2.RecommendResponse(candidate_source="request").SerializeToString()


def top_order(items: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best items, score desc then id asc (deterministic). Only the top k
    are sorted: partition first, keeping every item that ties with the k-th score (below ~300
    items one sort of them all is cheaper, and gives the same order)."""
    if probs.size <= 256:
        return np.lexsort((items, -probs))[:k]
    cand = np.arange(probs.size)
    if k < probs.size:
        cand = np.flatnonzero(probs >= probs[np.argpartition(-probs, k - 1)[k - 1]])
    return cand[np.lexsort((items[cand], -probs[cand]))][:k]


class ServiceError(Exception):
    """A failure with its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _rpc(method: str):
    """Counts, times and maps errors of one (async) servicer method."""
    latency = m.LATENCY.labels(method=method)
    counters: dict[grpc.StatusCode, Any] = {}  # labelled children, looked up once

    def count(code: grpc.StatusCode) -> None:
        child = counters.get(code)
        if child is None:
            child = counters[code] = m.REQUESTS.labels(method=method, code=code.name)
        child.inc()

    def wrap(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            t0 = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if isinstance(request, MalformedRequest):  # junk bytes (see serving.rpc_guard)
                    raise InvalidRequest(request.message)
                return await fn(self, request, context)
            except asyncio.CancelledError:  # grpc cancelled the call (deadline, client gone)
                code = grpc.StatusCode.CANCELLED
                raise
            except InvalidRequest as exc:
                code, msg = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
            except ServiceError as exc:
                code, msg = exc.code, str(exc)
            except ShardsUnavailable as exc:
                code, msg = grpc.StatusCode.UNAVAILABLE, str(exc)
            except Overloaded as exc:
                code, msg = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
            except (DeadlineExpired, FutureTimeout, CancelledError):
                code, msg = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before scoring finished"
            except Exception:
                log.exception("%s failed", method)
                code, msg = grpc.StatusCode.INTERNAL, f"{method} failed; see server log"
            finally:
                count(code)
                latency.observe(time.perf_counter() - t0)
            await context.abort(code, msg)

        return handler

    return wrap


class RecommenderService(pb2_grpc.RecommenderServicer):
    """The (``grpc.aio``) servicer; ``batcher`` is set by the server when micro-batching is on.

    Handlers run on the server's event loop and only validate, wait and build responses there;
    model work runs on ``pool`` threads (or the micro-batcher's), never on the loop. ``items``
    (an item catalog following hw.items) supplies candidates' item-side features to Recommend.
    """

    def __init__(self, cfg: ServeConfig, source: Any, calibrator: Calibrator,
                 pool: ThreadPoolExecutor | None = None, items: ItemSource | None = None) -> None:
        self.cfg = cfg
        self.source = source
        self.items = items
        self.calibrator = calibrator
        self.limits = Limits()
        # a ParamServer's state_dir: the ANN index is saved beside the replica there
        state_dir = getattr(getattr(source, "cfg", None), "state_dir", "")
        self.retriever = ItemRetriever(cfg.retrieval, cfg.item_slot, cfg.ann_min_items,
                                       max(self.limits.max_retrieve_k, cfg.retrieve_k), state_dir,
                                       index=cfg.ann_index)
        # The two-tower's item vectors (paramsync.retrieval_slots), when the trainer ships them;
        # their index is saved beside the replica too, in a directory of its own.
        self.vector_retriever = ItemRetriever(cfg.retrieval, ITEM_VECTORS, cfg.ann_min_items,
                                              max(self.limits.max_retrieve_k, cfg.retrieve_k), state_dir,
                                              index=cfg.ann_index, name="ann_two_tower")
        self.batcher: MicroBatcher | None = None
        self.pool = pool if pool is not None else ThreadPoolExecutor(max(cfg.workers, 1), thread_name_prefix="serve")
        self.bf16 = cfg.precision == "bfloat16" or (cfg.precision == "auto" and bf16_supported())
        self.rerank: RerankStage | None = None  # set by the server when an LLM is attached
        self.history: UserHistory | None = None  # live history: fills recent_items (cfg.recent_items)
        # DLRM work marks itself in flight here (the LLM steps wait their turn); the micro-batcher
        # marks its jobs, the unbatched paths below mark their calls
        self.arbiter: Arbiter | None = None

    def _model(self) -> ServingModel:
        model = self.source.current()
        if model is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "no model loaded yet")
        return model

    async def _offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking model work on the pool, keeping the event loop free for I/O."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    @staticmethod
    def lookup(table: Any, slot: str, ids: np.ndarray) -> torch.Tensor:
        """Embedding rows of ``ids`` in ``slot`` (float32[n, dim]); the one place the service reads
        a table outside the batched scoring path; on the host whatever device the table is on."""
        return table.lookup(slot, torch.from_numpy(np.ascontiguousarray(ids, np.int64))).cpu()

    # -- batched ranking ------------------------------------------------------------------------
    def forward_jobs(self, jobs: list[RankJob]) -> list[tuple[np.ndarray, ServingModel]]:
        """One model forward for many calls (the micro-batcher's forward)."""
        model = self._model()
        probs = score_jobs(model, jobs, self.calibrator, self.cfg.user_slot, self.cfg.item_slot, self.bf16,
                           self.items)
        return [(p, model) for p in probs]

    async def _rank(self, job: RankJob, context: Any) -> tuple[np.ndarray, ServingModel]:
        if self.batcher is None:  # the naive path: one model forward per call
            with self._dlrm_busy():
                return (await self._offload(self.forward_jobs, [job]))[0]
        remaining = context.time_remaining()
        if remaining is not None and remaining > 1e6:  # no deadline: grpc reports "forever"
            remaining = None
        deadline = float("inf") if remaining is None else time.monotonic() + remaining
        # Resolved from the batcher thread with one call_soon_threadsafe per batch. No timer of our own:
        # when the deadline passes, grpc cancels this handler, which cancels the queued job, and
        # the batcher drops jobs whose deadline passed anyway; either way they cost no compute.
        return await self.batcher.submit_async(job, cost=max(int(job.items.size), 1), deadline=deadline)

    def _retrieve(self, model: ServingModel, job: RankJob, k: int, query: np.ndarray | None) -> Retrieved:
        """Candidates by dot product between ``query`` (default: the pooled user/context bags) and
        the item rows: the ANN index or an exact scan (``serving.ann_retrieval``)."""
        if query is not None:
            return self._search(model, torch.from_numpy(query), k)
        user_vector = self._user_vector(model, job.user_id)
        if user_vector is not None:
            found = self.vector_retriever.retrieve(model.table, user_vector, k)
            return Retrieved(found.ids, f"two_tower_{found.source}", found.version)
        cfg = model.tower.cfg
        wanted = {}
        for slot in cfg.slots:
            if slot == self.cfg.item_slot:
                continue
            ids = job.context.get(slot, np.zeros(0, np.int64))
            if slot == self.cfg.user_slot:
                ids = np.concatenate([[job.user_id], ids]).astype(np.int64)
            if ids.size:
                wanted[slot] = ids
        prefetch = getattr(model.table, "prefetch", None)  # sharded: one fan-out for every slot
        table = model.table if prefetch is None else prefetch(wanted)
        query = torch.zeros(cfg.embedding_dim)
        for slot, ids in wanted.items():
            query += self.lookup(table, slot, ids).sum(dim=0)
        return self._search(model, query, k)

    def _user_vector(self, model: ServingModel, user_id: int) -> torch.Tensor | None:
        """The user's two-tower query vector: when the replica holds both retrieval slots and a
        row for this user (an unknown user reads zeros: the ranker's query answers instead)."""
        slots = model.table.slots
        if USER_VECTORS not in slots or ITEM_VECTORS not in slots:
            return None
        row = self.lookup(model.table, USER_VECTORS, np.array([user_id], np.int64))[0]
        return row if bool(row.abs().sum() > 0) else None

    def _search(self, model: ServingModel, query: torch.Tensor, k: int) -> Retrieved:
        search = getattr(model.table, "retrieve", None)  # sharded: each shard scans its own items
        if search is not None:
            return Retrieved(search(self.cfg.item_slot, query, k)[0], "exact", int(model.version))
        return self.retriever.retrieve(model.table, query, k)

    def _rerank_args(self, request) -> tuple[int, float]:
        """``(top_n, weight)`` of this call's rerank: the call's override, or the server's (its
        weight tuned online, ``serving.rerank_tuning``, unless tuning is off)."""
        if self.rerank is None:
            return 0, 0.0
        cfg = self.rerank.cfg
        n = request.rerank_top_n if request.HasField("rerank_top_n") else cfg.rerank_top_n
        w = request.rerank_weight if request.HasField("rerank_weight") else self.rerank.weight
        if not 0.0 <= w <= 1.0:  # also NaN
            raise InvalidRequest(f"rerank_weight must be in [0, 1], got {w}")
        return min(int(n), self.limits.max_candidates), float(w)

    @_rpc("Recommend")
    async def Recommend(self, request, context):
        model = self._model()
        job, top_k = rank_job(request, model.slots, model.dense_dim, self.cfg.item_slot, self.limits,
                              item_dense_width(model, self.items))
        fill_recent_items(job, model.slots, self.history, self.cfg.recent_items)
        if self.cfg.item_slot not in model.slots:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model has no item slot {self.cfg.item_slot!r}")
        rerank_n, weight = self._rerank_args(request)
        retrieve_k, query = retrieval_args(request, self.cfg.retrieve_k, model.tower.cfg.embedding_dim, self.limits)
        stage = _FROM_REQUEST
        if job.items.size == 0:
            found = await self._offload(self._retrieve, model, job, retrieve_k, query)
            job.items, top_k = found.ids, top_k or self.cfg.default_top_k
            stage = pb2.RecommendResponse(candidate_source=found.source,
                                          retrieval_version=found.version).SerializeToString()
        ids, scores = job.items[:0], np.zeros(0, np.float32)
        extra: dict[str, Any] = {}
        if job.items.size:
            probs, model = await self._rank(job, context)
            k = min(top_k or probs.size, probs.size)
            order = top_order(job.items, probs, max(k, min(rerank_n, probs.size)))
            if rerank_n > 1 and order.size > 1:
                order, extra = await self._reranked(job.user_id, job.items, probs, order, rerank_n, weight)
            order = order[:k]
            ids, scores = job.items[order], probs[order]
        # Already-encoded bytes (the server sends them as they are): see serving.response_wire.
        return encode_recommend_response(ids, scores, model_version=model.version, model_id=model.model_id,
                                         freshness_lag_ms=self.source.freshness_lag_ms(), **extra) + stage

    async def _reranked(self, user_id: int, items: np.ndarray, probs: np.ndarray, order: np.ndarray,
                        top_n: int, weight: float) -> tuple[np.ndarray, dict[str, Any]]:
        """The DLRM ``order`` with its head reordered by the LLM (or left, degraded)."""
        n = min(top_n, order.size)
        head = order[:n]
        outcome = await self.rerank.rerank(user_id, items[head], probs[head], weight)
        if isinstance(outcome, str):
            m.RERANK_DEGRADED.labels(outcome).inc()
            return order, {"degraded_reason": outcome}
        m.RERANK_CALLS.inc()
        order = np.concatenate([head[outcome.order], order[n:]])
        return order, {"llm_scores": outcome.llm_scores[outcome.order], "blended": outcome.blended[outcome.order],
                       "rerank_ms": outcome.llm_ms}

    def _score(self, request) -> Any:
        model = self._model()
        rows = example_rows(request, model.slots, model.dense_dim, self.limits)
        probs = score_examples(model, rows, self.calibrator, self.bf16)
        return pb2.ScoreResponse(probabilities=probs.tolist(), model_version=model.version,
                                 freshness_lag_ms=self.source.freshness_lag_ms())

    @_rpc("Score")
    async def Score(self, request, context):
        with self._dlrm_busy():
            return await self._offload(self._score, request)

    def _dlrm_busy(self) -> contextlib.AbstractContextManager:
        return self.arbiter.busy(Priority.DLRM) if self.arbiter is not None else contextlib.nullcontext()

    def _embeddings(self, request) -> Any:
        model = self._model()
        ids = embedding_ids(request, tuple(model.table.slots), self.limits)
        read = getattr(model.table, "lookup_known", None)  # sharded: rows and flags in one fan-out
        if read is not None:
            vecs, known = read(request.slot, ids)
        else:
            vecs, known = self.lookup(model.table, request.slot, ids), np.isin(ids, model.table.ids(request.slot))
        vecs = vecs.float().numpy()
        resp = pb2.GetEmbeddingsResponse(dim=int(vecs.shape[1]), model_version=model.version)
        for i, v, k in zip(ids.tolist(), vecs.tolist(), known.tolist()):
            resp.embeddings.add(id=i, values=v, known=k)
        return resp

    @_rpc("GetEmbeddings")
    async def GetEmbeddings(self, request, context):
        return await self._offload(self._embeddings, request)

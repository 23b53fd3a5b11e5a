"""``headwater.v1.Recommender``: request validation, retrieval, batched ranking, responses.

Each method maps failures to gRPC codes: malformed input -> INVALID_ARGUMENT naming the field, no
model yet -> UNAVAILABLE, queue full -> RESOURCE_EXHAUSTED, deadline passed -> DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import CancelledError, TimeoutError as FutureTimeout
from typing import Any

import grpc
import numpy as np
import torch

from serving import metrics as m
from serving.calibration import Calibrator
from serving.config import ServeConfig
from serving.microbatch import DeadlineExpired, MicroBatcher, Overloaded
from serving.pb import pb2, pb2_grpc
from serving.retrieval import ItemIndex
from serving.scoring import RankJob, ServingModel, bf16_supported, score_examples, score_jobs
from serving.validation import InvalidRequest, Limits, embedding_ids, example_rows, rank_job

log = logging.getLogger(__name__)

__all__ = ["RecommenderService", "ServiceError"]


class ServiceError(Exception):
    """A failure with its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _rpc(method: str):
    """Counts, times and maps errors of one servicer method."""

    def wrap(fn):
        @functools.wraps(fn)
        def handler(self, request, context):
            t0 = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return fn(self, request, context)
            except InvalidRequest as exc:
                code, msg = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
            except ServiceError as exc:
                code, msg = exc.code, str(exc)
            except Overloaded as exc:
                code, msg = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
            except (DeadlineExpired, FutureTimeout, CancelledError):
                code, msg = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before scoring finished"
            except Exception:
                log.exception("%s failed", method)
                code, msg = grpc.StatusCode.INTERNAL, f"{method} failed; see server log"
            finally:
                m.REQUESTS.labels(method=method, code=code.name).inc()
                m.LATENCY.labels(method=method).observe(time.perf_counter() - t0)
            context.abort(code, msg)

        return handler

    return wrap


class RecommenderService(pb2_grpc.RecommenderServicer):
    """The servicer; ``batcher`` is set by the server when micro-batching is on."""

    def __init__(self, cfg: ServeConfig, source: Any, calibrator: Calibrator) -> None:
        self.cfg = cfg
        self.source = source
        self.calibrator = calibrator
        self.limits = Limits()
        self.index = ItemIndex(cfg.item_slot)
        self.batcher: MicroBatcher | None = None
        self.bf16 = cfg.precision == "bfloat16" or (cfg.precision == "auto" and bf16_supported())

    def _model(self) -> ServingModel:
        model = self.source.current()
        if model is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "no model loaded yet")
        return model

    # -- batched ranking ------------------------------------------------------------------------
    def forward_jobs(self, jobs: list[RankJob]) -> list[tuple[np.ndarray, ServingModel]]:
        """One model forward for many calls (the micro-batcher's forward)."""
        model = self._model()
        probs = score_jobs(model, jobs, self.calibrator, self.cfg.user_slot, self.cfg.item_slot, self.bf16)
        return [(p, model) for p in probs]

    def _rank(self, job: RankJob, context: grpc.ServicerContext) -> tuple[np.ndarray, ServingModel]:
        if self.batcher is None:
            return self.forward_jobs([job])[0]
        remaining = context.time_remaining()
        if remaining is not None and remaining > 1e6:  # no deadline: grpc reports "forever"
            remaining = None
        deadline = float("inf") if remaining is None else time.monotonic() + remaining
        fut = self.batcher.submit(job, cost=max(int(job.items.size), 1), deadline=deadline)
        try:
            return fut.result(timeout=remaining)
        except FutureTimeout:
            fut.cancel()
            raise

    def _retrieve(self, model: ServingModel, job: RankJob) -> np.ndarray:
        """Candidates by dot product between the pooled user/context bags and every item row."""
        self.index.sync(model.table)
        cfg = model.tower.cfg
        query = torch.zeros(cfg.embedding_dim)
        for slot in cfg.slots:
            if slot == self.cfg.item_slot:
                continue
            ids = job.context.get(slot, np.zeros(0, np.int64))
            if slot == self.cfg.user_slot:
                ids = np.concatenate([[job.user_id], ids]).astype(np.int64)
            if ids.size:
                query += model.table.lookup(slot, torch.from_numpy(ids)).sum(dim=0)
        items, _ = self.index.topk(query, self.cfg.retrieve_k)
        return items

    @_rpc("Recommend")
    def Recommend(self, request, context):
        model = self._model()
        job, top_k = rank_job(request, model.slots, model.dense_dim, self.cfg.item_slot, self.limits)
        if self.cfg.item_slot not in model.slots:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model has no item slot {self.cfg.item_slot!r}")
        if job.items.size == 0:
            job.items = self._retrieve(model, job)
            top_k = top_k or self.cfg.default_top_k
        resp = pb2.RecommendResponse()
        if job.items.size:
            probs, model = self._rank(job, context)
            k = min(top_k or probs.size, probs.size)
            order = np.lexsort((job.items, -probs))[:k]  # score desc, then id asc (deterministic)
            for item, p in zip(job.items[order].tolist(), probs[order].tolist()):
                resp.items.add(item_id=item, score=p)
        resp.model_version = model.version
        resp.model_id = model.model_id
        resp.freshness_lag_ms = self.source.freshness_lag_ms()
        return resp

    @_rpc("Score")
    def Score(self, request, context):
        model = self._model()
        rows = example_rows(request, model.slots, model.dense_dim, self.limits)
        probs = score_examples(model, rows, self.calibrator, self.bf16)
        return pb2.ScoreResponse(probabilities=probs.tolist(), model_version=model.version,
                                 freshness_lag_ms=self.source.freshness_lag_ms())

    @_rpc("GetEmbeddings")
    def GetEmbeddings(self, request, context):
        model = self._model()
        ids = embedding_ids(request, tuple(model.table.slots), self.limits)
        vecs = model.table.lookup(request.slot, torch.from_numpy(ids)).float().numpy()
        known = np.isin(ids, model.table.ids(request.slot))
        resp = pb2.GetEmbeddingsResponse(dim=int(vecs.shape[1]), model_version=model.version)
        for i, v, k in zip(ids.tolist(), vecs.tolist(), known.tolist()):
            resp.embeddings.add(id=i, values=v, known=k)
        return resp

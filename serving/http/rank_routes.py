"""``POST /v1/rank``: candidates scored against one shared context, best first."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from llm_engine.scoring import DEFAULT_YES_TEMPLATE, ScoringError, ScoringOptions
from serving.http import metrics
from serving.http.errors import APIError
from serving.http.schemas import RankRequest, RankResponse, RankUsage
from serving.http.state import ServerState


def build_router(state: ServerState) -> APIRouter:
    router = APIRouter()
    backend = state.backend

    @router.post("/v1/rank", response_model=RankResponse)
    async def rank(req: RankRequest, request: Request) -> RankResponse:
        state.check_model(req.model)
        limit = state.config.max_candidates
        if len(req.candidates) > limit:
            raise APIError(400, f"{len(req.candidates)} candidates; at most {limit} per call", "candidates")
        options = ScoringOptions(
            method=req.method,
            normalize=req.normalize,
            length_alpha=req.length_alpha,
            template=req.template or DEFAULT_YES_TEMPLATE,
            yes_token=req.yes_token,
            no_token=req.no_token,
        )
        try:
            options.validate()
        except ScoringError as exc:
            raise APIError(400, str(exc), "template") from None
        # Length check before any work: the longest candidate sequence must fit the model.
        ctx_len = len(backend.encode(req.context))
        if req.method == "yes_prob":
            ctx_len += len(backend.encode(options.template.replace("{context}", "").replace("{candidate}", "")))
        longest = max(len(backend.encode(c)) for c in req.candidates)
        if ctx_len + longest + 1 > backend.max_model_len:
            raise APIError(
                400,
                f"context ({ctx_len} tokens) plus the longest candidate ({longest}) exceeds this model's "
                f"maximum context length of {backend.max_model_len} tokens",
                "context",
            )
        state.admission.acquire()
        start = time.perf_counter()
        rid = f"rank-{uuid.uuid4().hex}"
        try:
            result = await state.until_disconnect(request, backend.rank(rid, req.context, req.candidates, options))
        except ScoringError as exc:
            raise APIError(400, str(exc)) from None
        finally:
            state.admission.release()
        metrics.RANK_LATENCY.observe(time.perf_counter() - start)
        metrics.RANK_CANDIDATES.inc(len(req.candidates))
        return RankResponse(
            id=rid,
            model=backend.model_id,
            method=req.method,
            scores=result.scores,
            ranking=result.ranking,
            usage=RankUsage(prompt_tokens=result.prompt_tokens, cached_tokens=result.cached_tokens,
                            total_tokens=result.prompt_tokens),
        )

    return router

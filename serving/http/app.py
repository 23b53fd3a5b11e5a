"""The FastAPI application: routes, bearer-token check, error bodies, health and metrics."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from serving.http import metrics, openai_routes, rank_routes
from serving.http.backend import Backend
from serving.http.config import HttpServerConfig
from serving.http.errors import APIError, api_error_handler, error_body, validation_error_handler
from serving.http.schemas import ErrorResponse
from serving.http.state import Admission, ServerState

log = logging.getLogger(__name__)


def create_app(backend: Backend, config: HttpServerConfig | None = None,
               special_tokens: dict[str, str] | None = None) -> FastAPI:
    """An app serving ``backend``; ``/v1/*`` needs the bearer token when ``config.api_key`` is set."""
    config = config or HttpServerConfig()
    state = ServerState(backend, config, special_tokens=special_tokens or {})
    app = FastAPI(title="Headwater LLM server", version="1", description="Ranking and OpenAI-compatible generation.")
    app.state.hw = state
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    expected = f"Bearer {config.api_key}".encode() if config.api_key else None

    async def check_token(request: Request) -> None:
        if expected is None:
            return
        got = request.headers.get("authorization", "").encode()
        # Constant-time: the comparison must not reveal how much of a guess was right.
        if not hmac.compare_digest(got, expected):
            raise APIError(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(check_token)]
    app.include_router(rank_routes.build_router(state), dependencies=guarded, responses=WORK_ERRORS)
    app.include_router(openai_routes.build_router(state), dependencies=guarded, responses=WORK_ERRORS)

    @app.middleware("http")
    async def count(request: Request, call_next):  # noqa: ANN001, ANN202
        response = await call_next(request)
        route = request.scope.get("route")
        # Label by route template, never the raw path: unknown paths must not mint new series.
        metrics.REQUESTS.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response

    # Outermost: when every slot is taken, refuse before body parsing, auth and routing.
    app.add_middleware(ShedWhenFull, admission=state.admission, paths=WORK_PATHS)

    @app.get("/v1/models", dependencies=guarded, responses={401: ERRORS[401]})
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": backend.model_id, "object": "model", "created": int(time.time()), "owned_by": "headwater",
            "max_model_len": backend.max_model_len,
        }]}

    @app.get("/health")
    async def health() -> dict:
        s = backend.stats()
        return {"status": "ok", "model": backend.model_id, "waiting": s.waiting, "running": s.running,
                "in_flight": state.admission.in_flight}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def prometheus() -> Response:
        s = backend.stats()
        metrics.QUEUE_DEPTH.set(s.waiting)
        metrics.RUNNING.set(s.running)
        metrics.KV_USAGE.set(s.kv_usage)
        metrics.PREFIX_HIT_RATE.set(s.prefix_cache_hit_rate)
        metrics.PREFIX_MISMATCHES.set(s.prefix_cache_mismatches)
        metrics.SPEC_ACCEPTANCE.set(s.spec_acceptance_rate)
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi(app)
    return app


WORK_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/rank"})


class ShedWhenFull:
    """ASGI middleware: a POST to a work route while the admission limit is reached gets its
    429 at once, without reading its body. Under 3x overload most requests are refusals, and a
    refusal that costs validation, tokenising and routing would eat the CPU the admitted ones
    need; the routes' own ``acquire`` stays the authority (it also catches races)."""

    def __init__(self, app: Any, admission: Admission, paths: frozenset[str]) -> None:
        self.app, self.admission, self.paths = app, admission, paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.admission.full and scope["method"] == "POST" and scope["path"] in self.paths:
            exc = self.admission.rejection()
            await JSONResponse(error_body(exc.status, exc.message, exc.kind), exc.status, headers=exc.headers)(
                scope, receive, send)
            return
        await self.app(scope, receive, send)


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
ERRORS: dict[int | str, dict] = {
    400: {"model": ErrorResponse, "description": "invalid request; `param` names the field"},
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    404: {"model": ErrorResponse, "description": "unknown model name"},
    429: {"model": ErrorResponse, "description": "at capacity; retry after `Retry-After` seconds",
          "headers": _RETRY_AFTER},
}
WORK_ERRORS = dict(ERRORS)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema with our validation answer: a 400 :class:`ErrorResponse` (OpenAI's
    status and shape), never the 422 FastAPI documents by default."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema

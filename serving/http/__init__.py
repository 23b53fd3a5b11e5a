"""HTTP front of the LLM engine: ``/v1/rank`` and OpenAI-compatible generation (FastAPI).

``create_app(backend, config)`` builds the app over any :class:`~serving.http.backend.Backend`;
:class:`~serving.http.engine_backend.EngineBackend` is the one over :mod:`llm_engine`, and
:func:`~serving.http.server.serve` runs it under uvicorn until a stop event.
"""

from serving.http.app import create_app
from serving.http.backend import Backend, BackendStats, GenerateParams, TokenEvent
from serving.http.config import HttpServerConfig

__all__ = ["Backend", "BackendStats", "GenerateParams", "HttpServerConfig", "TokenEvent", "create_app"]

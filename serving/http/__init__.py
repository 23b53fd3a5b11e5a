"""HTTP front of the LLM engine: ``/v1/rank`` and OpenAI-compatible generation (FastAPI).

``create_app(backend, config)`` builds the app over any :class:`~serving.http.backend.Backend`;
:class:`~serving.http.engine_backend.EngineBackend` is the one over :mod:`llm_engine`, and
:func:`~serving.http.server.serve` runs it under uvicorn until a stop event.

Names resolve lazily: every ``headwater`` process reads :mod:`serving.http.config` to build its
CLI, and importing the app eagerly would register the LLM metrics (``hw_llm_*``) in processes
that serve no LLM, which dashboards would then read as an idle LLM server.
"""

from importlib import import_module

_EXPORTS = {
    "create_app": "serving.http.app",
    "Backend": "serving.http.backend",
    "BackendStats": "serving.http.backend",
    "GenerateParams": "serving.http.backend",
    "TokenEvent": "serving.http.backend",
    "HttpServerConfig": "serving.http.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'serving.http' has no attribute {name!r}")

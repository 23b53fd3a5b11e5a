"""Fixtures: a tiny random Llama behind the real HTTP server, and a real gRPC recommender."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_engine.random_model import build_random_llama


@pytest.fixture(scope="session")
def hardening_model_dir(tmp_path_factory) -> Path:
    return build_random_llama(tmp_path_factory.mktemp("hardening-llama"), max_positions=512)


@pytest.fixture(scope="module")
def engine_backend(hardening_model_dir):
    from llm_engine import EngineConfig
    from serving.http.engine_backend import EngineBackend

    backend = EngineBackend.from_model_dir(hardening_model_dir, "tiny",
                                           EngineConfig(max_model_len=256, num_kv_blocks=256))
    yield backend
    backend.close()

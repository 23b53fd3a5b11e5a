"""A tiny random Llama with a real byte-level BPE tokenizer, saved as a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_engine.random_model import build_random_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_random_llama(tmp_path_factory.mktemp("tiny-llama"), max_positions=512)

"""Fixtures: the one serving runtime (a real gRPC recommender with a real LLM engine in-process)."""

from __future__ import annotations

import grpc
import pytest

from serving.pb import pb2_grpc
from tests.rerank.rerank_helpers import item_text


@pytest.fixture(scope="session")
def llm_dir(tmp_path_factory):
    from llm_engine.random_model import build_random_llama

    return build_random_llama(tmp_path_factory.mktemp("rerank_llm"), seed=3, max_positions=2048)


class StageBackend:
    """The stage's view of an LLM: a tokenizer and a length limit, nothing to run."""

    bos_token_id = None
    kv_capacity_tokens = 1 << 20

    def __init__(self, tok, max_model_len: int) -> None:
        self.tok, self.max_model_len = tok, max_model_len

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text)


@pytest.fixture
def stage(llm_dir):
    """``stage(max_model_len=2048, texts=None, **rerank_cfg) -> RerankStage`` with the real
    tokenizer, no engine, and a history of its own (texts: items 0..199 unless given)."""
    from llm_engine.tokenizer import Tokenizer
    from serving.item_text import ItemTexts
    from serving.rerank import RerankConfig, RerankStage
    from serving.user_history import UserHistory

    tok = Tokenizer.from_pretrained(llm_dir)

    def make(max_model_len: int = 2048, texts: dict[int, str] | None = None, **kw) -> RerankStage:
        store = ItemTexts()
        store.update((texts or {i: item_text(i) for i in range(200)}).items())
        return RerankStage(RerankConfig(**kw), StageBackend(tok, max_model_len), store, UserHistory())

    return make


@pytest.fixture
def runtime(llm_dir):
    """``runtime(**rerank_cfg) -> LlmRuntime`` (no HTTP, no follower) with texts for items 0..199."""
    from llm_engine import EngineConfig
    from serving.item_text import ItemTextConfig
    from serving.llm_runtime import LlmRuntime, LlmRuntimeConfig
    from serving.rerank import RerankConfig
    from serving.user_history import HistoryConfig

    made = []

    def make(engine: EngineConfig | None = None, llm_port: int = -1, **kw):
        kw.setdefault("rerank_top_n", 10)
        kw.setdefault("rerank_deadline_ms", 30_000.0)  # tests of the order must not race the clock
        rt = LlmRuntime(LlmRuntimeConfig(llm=str(llm_dir), llm_port=llm_port), engine or EngineConfig(),
                        RerankConfig(**kw), ItemTextConfig(), HistoryConfig()).start()
        rt.texts.update((i, item_text(i)) for i in range(200))
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.stop()


@pytest.fixture
def serve_with(runtime):
    """``serve_with(rt, model=None, **serve_cfg) -> stub``: a RecommendServer with the runtime's rerank."""
    from serving.config import ServeConfig
    from serving.server import RecommendServer, StaticModelSource
    from serving.testing import random_model

    started = []

    def start(rt, model=None, **kw):
        kw.setdefault("precision", "float32")
        server = RecommendServer(ServeConfig(port=0, **kw), StaticModelSource(model or random_model()),
                                 rerank=rt).start()
        channel = grpc.insecure_channel(server.address)
        started.append((server, channel))
        return pb2_grpc.RecommenderStub(channel)

    yield start
    for server, channel in started:
        channel.close()
        server.stop(0)

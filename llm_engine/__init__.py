"""LLM engine: Llama-family models over a paged KV cache with continuous batching.

Public API: :class:`LLM` (offline), :class:`LLMEngine` (step-wise), :class:`AsyncLLMEngine`
(streaming), :class:`SamplingParams`, :class:`EngineConfig`. Of the other Headwater packages it
depends only on ``batching`` (the scheduler's request queue).
"""

from llm_engine.config import EngineConfig, ModelConfig
from llm_engine.engine import LLMEngine
from llm_engine.llm import LLM
from llm_engine.outputs import RequestOutput
from llm_engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "ModelConfig", "SamplingParams", "RequestOutput", "AsyncLLMEngine"]


def __getattr__(name: str):
    if name == "AsyncLLMEngine":
        from llm_engine.async_engine import AsyncLLMEngine
        return AsyncLLMEngine
    raise AttributeError(name)

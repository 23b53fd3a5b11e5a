"""Offline batch API: ``LLM(path).generate(prompts, params)``."""

from __future__ import annotations

from pathlib import Path

from llm_engine.config import EngineConfig
from llm_engine.engine import LLMEngine
from llm_engine.outputs import RequestOutput
from llm_engine.sampling_params import SamplingParams


class LLM:
    """Load a model folder and generate for many prompts at once with continuous batching.

    Keyword arguments are :class:`EngineConfig` fields (``max_num_seqs=...``, ``device=...``).
    """

    def __init__(self, model: str | Path, **engine_kwargs):
        self.engine = LLMEngine(model, EngineConfig(**engine_kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[int] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 priorities: list[int] | None = None) -> list[RequestOutput]:
        """Outputs in prompt order. A flat list of ints is one tokenised prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("need one SamplingParams per prompt")
        ids = [self.engine.add_request(p, sp, priority=(priorities[i] if priorities else 0))
               for i, (p, sp) in enumerate(zip(prompts, params))]
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def chat(self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """One chat turn rendered with the model's template."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(prompt, sampling_params)[0]

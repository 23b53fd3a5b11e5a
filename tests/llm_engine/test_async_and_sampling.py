"""Streaming API with cancellation, and the sampling controls."""

from __future__ import annotations

import asyncio
import math

import torch

from llm_engine import LLM, AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams
from llm_engine.sampling import sample


def test_async_streams_tokens_and_cancel_frees_blocks(tiny_llama):
    path, _ = tiny_llama

    async def main():
        eng = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=4, enable_prefix_caching=False))
        aeng = AsyncLLMEngine(eng)
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

        async def full():
            return [o async for o in aeng.generate([1, 2, 3], params)]

        async def cancelled():
            async for o in aeng.generate(list(range(1, 30)), SamplingParams(max_tokens=500, ignore_eos=True)):
                if len(o.token_ids) == 2:
                    break  # leaving the stream aborts the request
        streamed, _ = await asyncio.gather(full(), cancelled())
        await aeng.shutdown()
        return eng, streamed

    eng, streamed = asyncio.run(main())
    assert [len(o.token_ids) for o in streamed] == [1, 2, 3, 4, 5, 6]
    assert streamed[-1].finished and streamed[-1].finish_reason == "length"
    assert eng.pool.num_used == 0 and not eng.has_unfinished()


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_llama):
    path, _ = tiny_llama
    llm = LLM(path, num_kv_blocks=64, block_size=4)
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    alone = llm.generate([[1, 2, 3]], p)[0].token_ids
    batched = llm.generate([[9, 9], [1, 2, 3], [4]], [SamplingParams(max_tokens=5, ignore_eos=True), p,
                                                      SamplingParams(max_tokens=3, seed=1, ignore_eos=True)])[1]
    other = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=12, temperature=1.0, seed=8, ignore_eos=True))[0]
    assert alone == batched.token_ids and other.token_ids != alone


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    draws = {name: set() for name in ("k", "p", "minp")}
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.7), SamplingParams(min_p=0.5)]
    for step in range(200):
        ids = sample(logits, params, [1, 2, 3], [step] * 3).token_ids.tolist()
        for name, t in zip(draws, ids):
            draws[name].add(t)
    assert draws == {"k": {0, 1}, "p": {0, 1}, "minp": {0, 1}}


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    ids = [sample(logits, [SamplingParams()], [5], [s]).token_ids.item() for s in range(2000)]
    freq = [ids.count(i) / 2000 for i in range(3)]
    assert all(abs(f - e) < 0.04 for f, e in zip(freq, (0.7, 0.2, 0.1)))


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    greedy = SamplingParams(temperature=0, repetition_penalty=1.5)
    assert sample(logits, [greedy], [0], [0], history=[[0]]).token_ids.item() == 1
    assert sample(logits, [SamplingParams(temperature=0)], [0], [0], history=[[0]]).token_ids.item() == 0


def test_stop_strings_stop_ids_and_logprobs(tiny_llama):
    path, _ = tiny_llama
    llm = LLM(path, num_kv_blocks=64, block_size=4)
    base = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    third = base.token_ids[2]
    by_id = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[third]))[0]
    assert by_id.token_ids == base.token_ids[:3] and by_id.stop_reason == third
    word = f"w{base.token_ids[1]}"
    by_str = llm.generate("w1 w2 w3", SamplingParams(max_tokens=8, temperature=0, stop=[word]))[0]
    assert by_str.finish_reason == "stop" and word not in by_str.text
    lp = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0, logprobs=2, prompt_logprobs=1))[0]
    assert len(lp.logprobs) == 3 and all(len(e) >= 2 for e in lp.logprobs)
    assert all(max(e.values()) == e[t] for e, t in zip(lp.logprobs, lp.token_ids))  # greedy = top-1
    assert lp.prompt_logprobs[0] is None and len(lp.prompt_logprobs) == 3
    assert all(v <= 0 and not math.isnan(v) for e in lp.prompt_logprobs[1:] for v in e.values())

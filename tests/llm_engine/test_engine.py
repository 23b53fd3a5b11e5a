"""Engine behaviour: continuous batching, chunked prefill, prefix caching, preemption, priorities, abort."""

from __future__ import annotations

import pytest

from llm_engine import LLM, EngineConfig, LLMEngine, SamplingParams
from llm_engine_helpers import drain, prompts


GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def test_batching_chunking_and_small_budget_do_not_change_greedy_output(tiny_llama):
    path, _ = tiny_llama
    ps = prompts(5)
    solo = [run_one(path, p) for p in ps]
    eng = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=7, max_num_seqs=3))
    for p in ps:
        eng.add_request(p, GREEDY)
    out = drain(eng)
    assert [out[str(i)] for i in range(5)] == solo
    assert sum(eng.pool.ref_cnt) == 0  # finished requests hold no blocks (cached ones stay revivable)
    assert eng.pool.num_free == eng.pool.num_blocks


def run_one(path, p):
    eng = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=4, enable_prefix_caching=False))
    eng.add_request(p, GREEDY)
    return drain(eng)["0"]


def test_decodes_are_scheduled_before_prefill_chunks(tiny_llama):
    path, _ = tiny_llama
    eng = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=8))
    eng.add_request(prompts(1, 5)[0], GREEDY, request_id="first")
    eng.step()  # prefill of 'first' done, it is decoding now
    eng.add_request(list(range(1, 40)), GREEDY, request_id="long")
    sched = eng.scheduler.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in sched.scheduled] == [("first", 1), ("long", 7)]


def test_prefix_cache_hit_gives_same_output(tiny_llama):
    path, _ = tiny_llama
    shared = list(range(1, 33))
    eng = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=4))
    eng.add_request(shared + [5, 6], GREEDY, request_id="a")
    a = drain(eng)["a"]
    eng.add_request(shared + [5, 6], GREEDY, request_id="b")
    sched_hits = []
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                sched_hits.append(o.num_cached_tokens)
                b = o.token_ids
    assert sched_hits == [33] and b == a  # 8 shared blocks, then 1 token copied (the last is computed)
    assert eng.pool.hits >= 8


def test_preemption_recomputes_and_output_is_identical(tiny_llama):
    path, _ = tiny_llama
    ps = prompts(4, 10)
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=123, ignore_eos=True)
    roomy = LLMEngine(path, EngineConfig(num_kv_blocks=128, block_size=4))
    tight = LLMEngine(path, EngineConfig(num_kv_blocks=16, block_size=4, enable_prefix_caching=False))
    for p in ps:
        roomy.add_request(p, params)
        tight.add_request(p, params)
    a, b = drain(roomy), drain(tight)
    assert a == b
    assert any(s > 0 for s in [tight.pool.peak_used]) and tight.pool.peak_used <= 16
    assert tight.scheduler.num_preemptions > 0


def test_priority_runs_first_and_low_priority_is_not_starved(tiny_llama):
    path, _ = tiny_llama
    eng = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=4, max_num_seqs=1))
    eng.add_request([1, 2, 3], GREEDY, request_id="low", priority=5)
    eng.add_request([4, 5, 6], GREEDY, request_id="high", priority=0)
    order = []
    while eng.has_unfinished():
        order += [o.request_id for o in eng.step() if o.finished]
    assert order == ["high", "low"]


def test_abort_frees_blocks_immediately(tiny_llama):
    path, _ = tiny_llama
    eng = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=4, enable_prefix_caching=False))
    eng.add_request(list(range(1, 30)), GREEDY, request_id="x")
    eng.step()
    assert eng.pool.num_used > 0
    out = eng.abort_request("x")
    assert out.finish_reason == "abort" and eng.pool.num_used == 0 and not eng.has_unfinished()


def test_bad_input_is_rejected_clearly(tiny_llama):
    path, _ = tiny_llama
    eng = LLMEngine(path, EngineConfig(num_kv_blocks=8, block_size=4, max_model_len=16))
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request([1, 5000])
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request(list(range(1, 20)))
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([])
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_max_model_len_ends_generation(tiny_llama):
    path, _ = tiny_llama
    llm = LLM(path, num_kv_blocks=16, block_size=4, max_model_len=12)
    (o,) = llm.generate([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    assert o.finish_reason == "length" and len(o.token_ids) == 2


def test_next_priority_is_the_most_urgent_class_the_next_step_would_run(tiny_llama):
    path, _ = tiny_llama
    eng = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=4, max_num_seqs=1))
    assert eng.scheduler.next_priority() is None  # no work
    eng.add_request(prompts(1, 5)[0], GREEDY, request_id="gen", priority=3)
    assert eng.scheduler.next_priority() == 3
    eng.step()  # 'gen' runs and takes the only sequence slot
    eng.add_request(prompts(1, 5)[0], GREEDY, request_id="rerank", priority=1)
    assert eng.scheduler.next_priority() == 3  # no free slot: the queued rerank cannot join the step
    eng.abort_request("gen")
    assert eng.scheduler.next_priority() == 1

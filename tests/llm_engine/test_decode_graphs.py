"""Padded decode (everything around CUDA-graph capture) on CPU: a decode step padded to a captured
batch size computes what the unpadded step does, its padded rows write K/V only into the scratch
block, and an engine routing decode steps through it generates the same tokens. ``eager_step``
stands in for capture, which needs CUDA and is not run here."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llm_engine import EngineConfig, LLMEngine, SamplingParams
from llm_engine.decode_graphs import capture_sizes, eager_step
from llm_engine_helpers import drain

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def engine(path, **kw) -> LLMEngine:
    return LLMEngine(path, EngineConfig(**({"num_kv_blocks": 64, "block_size": 4, "speculative": False} | kw)))


def test_capture_sizes_double_up_to_the_maximum():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(16) == [1, 2, 4, 8, 16]


@pytest.mark.parametrize("n, bucket", [(3, 4), (5, 8), (8, 8)])
def test_padded_decode_step_matches_unpadded_and_padded_rows_write_only_the_scratch_block(tiny_llama, n, bucket):
    path, _ = tiny_llama
    eng = engine(path)
    for i in range(n):
        eng.add_request([(5 * i + j) % 120 + 1 for j in range(6 + 3 * i)], GREEDY)
    eng.step()  # all prefills: every request decodes next
    sched = eng.scheduler.schedule()
    assert all(s.num_tokens == 1 for s in sched.scheduled) and len(sched.scheduled) == n
    kv = eng.runner.kv_cache
    before = kv.clone()
    plain, inp = eng.runner.execute(sched)
    plain_kv = kv.clone()
    kv.copy_(before)
    scratch = eng.pad_decode(eager_step, 8)
    assert eng.runner.decode.bucket(n) == bucket
    padded, _ = eng.runner.execute(sched)
    assert eng.runner.decode.runs[bucket] == sum(eng.runner.decode.runs.values()) == 1 and padded.shape == plain.shape
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)
    rows = inp.last_rows
    assert torch.equal(eng.runner.logits(padded, rows).argmax(-1), eng.runner.logits(plain, rows).argmax(-1))
    others = [b for b in range(kv.shape[2]) if b != scratch]
    torch.testing.assert_close(kv[:, :, others], plain_kv[:, :, others], rtol=1e-5, atol=1e-5)
    if bucket > n:  # padded rows wrote their K/V, and only there
        assert not torch.equal(kv[:, :, scratch], before[:, :, scratch])
    else:
        assert torch.equal(kv[:, :, scratch], before[:, :, scratch])


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)],
                         ids=["greedy", "seeded"])
def test_engine_with_padded_decode_generates_the_same_tokens(tiny_llama, params):
    path, _ = tiny_llama
    # Output lengths differ, so the decode batch shrinks 6 -> 1: steps above max_batch=4 run
    # unpadded, the rest through buckets 4, 2 and 1.
    ps = [[(7 * i + 3 * j) % 120 + 1 for j in range(5 + 2 * i)] for i in range(6)]
    lens = [3, 5, 7, 9, 11, 12]

    def run(eng):
        ids = [eng.add_request(p, replace(params, max_tokens=m)) for p, m in zip(ps, lens)]
        out = drain(eng)
        return [out[i] for i in ids]

    plain = run(engine(path, max_num_seqs=6))
    eng = engine(path, max_num_seqs=6)
    scratch = eng.pad_decode(eager_step, 4)
    assert run(eng) == plain
    assert all(eng.runner.decode.runs[b] > 0 for b in (1, 2, 4))
    assert eng.pool.ref_cnt[scratch] == 1 and sum(eng.pool.ref_cnt) == 1  # only the scratch block is held

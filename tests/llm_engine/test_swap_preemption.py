"""Swap preemption: a victim's KV goes to host memory and comes back, so it resumes without
recompute and generates exactly what an unpreempted run does; a full swap area falls back to
recompute; an abort frees the host slots; bad settings fail at start-up with a clear message."""

from __future__ import annotations

import pytest
import torch

from llm_engine import EngineConfig, LLMEngine, SamplingParams
from llm_engine.block_pool import BlockPool
from llm_engine.kv_cache import KVCacheManager
from llm_engine.scheduler import SchedulerOutput
from llm_engine.sequence import Sequence, SeqStatus
from llm_engine_helpers import drain, prompts

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=0.8, seed=123, ignore_eos=True)


def run(eng: LLMEngine, ps: list[list[int]], params: SamplingParams) -> dict[str, list[int]]:
    for p in ps:
        eng.add_request(p, params)
    return drain(eng)


def count_tokens(eng: LLMEngine) -> list[int]:
    """Records the tokens each step computes (a pass-through wrapper: the real runner runs)."""
    seen, execute = [], eng.runner.execute

    def counted(out):
        seen.append(out.num_tokens)
        return execute(out)
    eng.runner.execute = counted
    return seen


def tight(path, **kw) -> LLMEngine:
    cfg = dict(num_kv_blocks=16, block_size=4, enable_prefix_caching=False, speculative=False,
               preemption_mode="swap", num_swap_blocks=64)
    return LLMEngine(path, EngineConfig(**(cfg | kw)))


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_swapped_requests_resume_without_recompute_and_output_is_identical(tiny_llama, params):
    path, _ = tiny_llama
    ps = prompts(4, 10)
    roomy = run(LLMEngine(path, EngineConfig(num_kv_blocks=128, block_size=4, speculative=False)), ps, params)
    eng = tight(path)
    computed = count_tokens(eng)
    assert run(eng, ps, params) == roomy
    s = eng.scheduler
    assert s.num_preemptions > 0 and s.num_swaps_out == s.num_preemptions == s.num_swaps_in
    # Every prompt token and every output token but the last is computed exactly once.
    assert sum(computed) == sum(len(p) + params.max_tokens - 1 for p in ps)
    recompute = tight(path, preemption_mode="recompute")
    recomputed = count_tokens(recompute)
    assert run(recompute, ps, params) == roomy and sum(recomputed) > sum(computed)  # the count can tell
    assert eng.kv.host.num_free == eng.kv.host.num_blocks and sum(eng.pool.ref_cnt) == 0


def test_shared_prefix_blocks_stay_referenced_while_swapped_and_output_is_identical(tiny_llama):
    path, _ = tiny_llama
    ps = [list(range(1, 13)) + [50 + i, 60 + i] for i in range(4)]  # three shared full blocks
    roomy = run(LLMEngine(path, EngineConfig(num_kv_blocks=128, block_size=4)), ps, GREEDY)
    eng = tight(path, num_kv_blocks=14, enable_prefix_caching=True, speculative=True, max_num_batched_tokens=8)
    for p in ps:
        eng.add_request(p, GREEDY)
    out, kept = {}, 0
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o.token_ids
        for item in eng.scheduler.waiting.items.values():
            seq = item.payload
            if seq.status is SeqStatus.SWAPPED:
                held = [b for i, b in enumerate(seq.block_table) if i not in {j for j, _ in seq.swapped}]
                kept = max(kept, len(held))
                assert all(eng.pool.ref_cnt[b] >= 1 for b in held)
    assert out == roomy and kept > 0 and eng.scheduler.num_swaps_out > 0
    assert eng.kv.host.num_free == eng.kv.host.num_blocks and sum(eng.pool.ref_cnt) == 0


def test_full_swap_space_falls_back_to_recompute_and_output_is_identical(tiny_llama):
    path, _ = tiny_llama
    ps = prompts(4, 10)
    roomy = run(LLMEngine(path, EngineConfig(num_kv_blocks=128, block_size=4, speculative=False)), ps, SEEDED)
    eng = tight(path, num_swap_blocks=8)  # room for one victim at a time, not two
    assert run(eng, ps, SEEDED) == roomy
    s = eng.scheduler
    assert 0 < s.num_swaps_out < s.num_preemptions and s.num_swaps_in == s.num_swaps_out
    assert eng.kv.host.num_free == 8


def test_abort_of_a_swapped_request_frees_its_host_slots_and_blocks(tiny_llama):
    path, _ = tiny_llama
    eng = tight(path)
    for p in prompts(4, 10):
        eng.add_request(p, GREEDY)
    swapped = None
    while swapped is None:
        eng.step()
        swapped = next((it.payload for it in eng.scheduler.waiting.items.values()
                        if it.payload.status is SeqStatus.SWAPPED), None)
    host = eng.kv.host
    held = len(swapped.swapped)
    assert held > 0 and host.num_free == host.num_blocks - held
    eng.abort_request(swapped.request_id)
    assert host.num_free == host.num_blocks and not swapped.swapped
    assert swapped.request_id not in eng.scheduler.waiting.items
    while eng.has_unfinished():
        eng.step()
    assert host.num_free == host.num_blocks and sum(eng.pool.ref_cnt) == 0


def test_manager_swaps_out_only_unshared_blocks_and_swap_in_restores_table_and_hashes():
    pool, host = BlockPool(16), BlockPool(8, enable_caching=False)
    kv = KVCacheManager(pool, block_size=4, host=host)
    a = Sequence("a", list(range(10)), SamplingParams())
    kv.allocate(a, 10)
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)
    b = Sequence("b", list(range(8)) + [50, 51, 52, 53, 54], SamplingParams())
    kv.admit_cached_prefix(b)  # shares a's two full blocks
    kv.allocate(b, 5)
    b.num_computed_tokens = 13
    kv.cache_full_blocks(b)  # b's own third block is full and hashed, the fourth is partial
    shared, own = b.block_table[:2], b.block_table[2:]
    moves = kv.swap_out(b)
    assert [m[0] for m in moves] == own and [i for i, _ in b.swapped] == [2, 3]
    assert [pool.ref_cnt[x] for x in shared] == [2, 2] and [pool.ref_cnt[x] for x in own] == [0, 0]
    assert host.num_free == 6 and b.num_computed_tokens == 13 and len(b.block_hashes) == 3
    slots = [h for _, h in b.swapped]
    filler = pool.allocate(pool.num_free)  # evicts everything free, b's old blocks included
    assert kv.swap_in(b, 1) is None and [h for _, h in b.swapped] == slots  # short: nothing changed
    pool.release(filler[:2])
    moves = kv.swap_in(b, 1)
    assert moves == list(zip(slots, b.block_table[2:])) and b.block_table[:2] == shared
    assert not b.swapped and host.num_free == 8 and kv.tables.array[b.kv_row, :4].tolist() == b.block_table
    assert pool.lookup(b.block_hashes[2]) == b.block_table[2]  # its prefix-cache entry is back


def test_swap_out_declines_when_the_host_area_is_short():
    pool, host = BlockPool(16), BlockPool(2, enable_caching=False)
    kv = KVCacheManager(pool, block_size=4, host=host)
    a = Sequence("a", list(range(12)), SamplingParams())
    kv.allocate(a, 12)
    table = list(a.block_table)
    assert kv.swap_out(a) is None and a.block_table == table and not a.swapped and host.num_free == 2


def test_runner_swap_round_trips_block_contents(tiny_llama):
    path, _ = tiny_llama
    eng = tight(path)
    kv = eng.runner.kv_cache
    kv.copy_(torch.randn_like(kv))
    before = kv[:, :, [3, 5]].clone()
    eng.runner.swap(SchedulerOutput(blocks_to_swap_out=[(3, 0), (5, 7)]))
    kv[:, :, [3, 5]] = 0
    eng.runner.swap(SchedulerOutput(blocks_to_swap_in=[(7, 9), (0, 10)]))
    assert torch.equal(kv[:, :, [10, 9]], before)


def test_swap_and_graph_settings_are_validated_clearly(tiny_llama):
    path, _ = tiny_llama
    with pytest.raises(ValueError, match="preemption_mode must be 'recompute' or 'swap'"):
        EngineConfig(preemption_mode="swapp")
    with pytest.raises(ValueError, match="swap_space_bytes must be >= 0"):
        EngineConfig(swap_space_bytes=-1)
    with pytest.raises(ValueError, match="cuda_graph_max_batch must be >= 1"):
        EngineConfig(cuda_graph_max_batch=0)
    with pytest.raises(ValueError, match="needs host swap space"):
        LLMEngine(path, EngineConfig(num_kv_blocks=16, block_size=4, preemption_mode="swap", swap_space_bytes=100))
    with pytest.raises(ValueError, match="cuda_graphs needs device='cuda'"):
        LLMEngine(path, EngineConfig(num_kv_blocks=16, block_size=4, device="cpu", cuda_graphs=True))

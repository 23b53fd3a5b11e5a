"""The per-step fast paths compute exactly what the plain per-sequence definitions say.

Block tables live in one persistent array updated as blocks are appended; the runner derives a
step's positions, slot mapping and block table from it with array ops; q/k/v and gate/up
projections are fused; an all-greedy batch skips the sampler's general path.
"""

from __future__ import annotations

import numpy as np
import torch

from llm_engine import EngineConfig, LLMEngine, SamplingParams
from llm_engine.block_pool import BlockPool
from llm_engine.kv_cache import BlockTableArray, KVCacheManager
from llm_engine.model.loader import load_model
from llm_engine.sampling import sample
from llm_engine.scheduler import ScheduledSeq, SchedulerOutput
from llm_engine.sequence import Sequence


def test_token_slice_equals_slicing_the_concatenation():
    seq = Sequence("a", [1, 2, 3, 4], SamplingParams())
    seq.output_token_ids.extend([5, 6, 7])
    for lo in range(8):
        for hi in range(lo, 8):
            assert seq.token_slice(lo, hi) == seq.all_token_ids[lo:hi]


def test_block_table_array_reuses_rows_and_grows_keeping_content():
    t = BlockTableArray(rows=2, cols=2)
    a, b = t.acquire(), t.acquire()
    t.write(a, 0, [7, 8])
    t.write(b, 0, [9])
    c = t.acquire()  # third row: the array doubles its rows
    t.write(c, 0, [1, 2, 3, 4, 5])  # five blocks: columns grow
    assert t.array.shape[0] >= 3 and t.array.shape[1] >= 5
    assert t.array[a, :2].tolist() == [7, 8] and t.array[b, 0] == 9 and t.array[c, :5].tolist() == [1, 2, 3, 4, 5]
    t.release(b)
    assert t.acquire() == b


def test_manager_mirrors_every_block_table_through_prefix_reuse_and_free():
    pool = BlockPool(16)
    kv = KVCacheManager(pool, block_size=4)

    def mirrored(seq):
        return kv.tables.array[seq.kv_row, :len(seq.block_table)].tolist() == seq.block_table

    a = Sequence("a", list(range(10)), SamplingParams())
    kv.allocate(a, 10)
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)
    b = Sequence("b", list(range(8)) + [50, 51, 52], SamplingParams())
    kv.admit_cached_prefix(b)  # two shared blocks
    kv.allocate(b, 3)
    assert mirrored(a) and mirrored(b) and a.kv_row != b.kv_row
    row = a.kv_row
    kv.free(a)
    assert a.kv_row == -1
    c = Sequence("c", [60] * 9, SamplingParams())
    kv.allocate(c, 9)  # takes a's row back; stale entries are overwritten from 0
    assert c.kv_row == row and mirrored(c)
    kv.free(b), kv.free(c), kv.free(c)  # a second free is harmless
    assert pool.num_free == 16


def test_step_inputs_match_the_per_sequence_definition(tiny_llama):
    path, _ = tiny_llama
    bs = 4
    eng = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=bs, speculative=False))
    seqs = []
    for i, (plen, out) in enumerate([(9, 3), (5, 0), (13, 1)]):
        s = Sequence(str(i), [(3 * i + j) % 100 + 1 for j in range(plen)], SamplingParams())
        s.output_token_ids.extend([7] * out)
        seqs.append(s)
    # a decode (all but the last token computed), a whole prompt, a chunk in the middle
    sched = SchedulerOutput([ScheduledSeq(seqs[0], 11, 1), ScheduledSeq(seqs[1], 0, 5), ScheduledSeq(seqs[2], 4, 6)])
    for s in sched.scheduled:
        assert eng.kv.allocate(s.seq, s.start + s.num_tokens)
    inp = eng.runner.prepare(sched)
    ids, pos, slots, tables = [], [], [], []
    for s in sched.scheduled:
        p = list(range(s.start, s.start + s.num_tokens))
        ids += s.seq.all_token_ids[s.start:s.start + s.num_tokens]
        pos += p
        slots += [s.seq.block_table[x // bs] * bs + x % bs for x in p]
        tables.append(s.seq.block_table)
    assert inp.input_ids.tolist() == ids and inp.positions.tolist() == pos
    assert inp.meta.slot_mapping.tolist() == slots
    assert inp.meta.query_start_loc.tolist() == [0, 1, 6, 12] and inp.last_rows.tolist() == [0, 5, 11]
    assert inp.meta.seq_lens.tolist() == [12, 5, 10] and inp.meta.max_query_len == 6
    bt = inp.meta.block_tables
    for i, t in enumerate(tables):
        assert bt[i, :len(t)].tolist() == t
    assert bt.shape[1] == 3  # ceil(max seq_len 12 / 4)


def test_fused_projections_are_views_with_unchanged_names(tiny_llama):
    path, _ = tiny_llama
    model = load_model(path)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.qkv_weight is not None and mlp.gate_up_weight is not None
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()
    assert torch.equal(attn.qkv_weight[-attn.v_proj.weight.shape[0]:], attn.v_proj.weight)
    assert torch.equal(mlp.gate_up_weight[mlp.gate_proj.weight.shape[0]:], mlp.up_proj.weight)
    assert "model.layers.0.self_attn.k_proj.weight" in model.state_dict()
    assert not any("qkv" in n or "gate_up" in n for n in model.state_dict())


def test_fused_and_unfused_forward_agree(tiny_qwen2):
    path, _ = tiny_qwen2  # QKV biases exercise the fused bias too
    eng = LLMEngine(path, EngineConfig(num_kv_blocks=32, block_size=4, speculative=False))
    seq = Sequence("x", list(range(1, 12)), SamplingParams())
    eng.kv.allocate(seq, 11)
    sched = SchedulerOutput([ScheduledSeq(seq, 0, 11)])
    fused, _ = eng.runner.execute(sched)
    for layer in eng.model.model.layers:
        layer.self_attn.qkv_weight = None
        layer.mlp.gate_up_weight = None
    plain, _ = eng.runner.execute(sched)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_all_greedy_fast_path_equals_the_general_sampler():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    greedy = SamplingParams(temperature=0)
    fast = sample(logits, [greedy] * 5, [0] * 5, [0] * 5)
    # one sampled row sends the batch down the general path; the greedy rows must not change
    mixed = sample(logits, [greedy] * 4 + [SamplingParams(temperature=1.0)], [0] * 5, [0] * 5)
    assert fast.logprobs is None and fast.top_ids is None
    assert torch.equal(fast.token_ids[:4], mixed.token_ids[:4])
    assert torch.equal(fast.token_ids, logits.argmax(-1))
    assert np.array_equal(fast.token_ids.numpy(), logits.numpy().argmax(-1))

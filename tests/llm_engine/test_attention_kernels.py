"""Triton paged-attention kernels agree with the PyTorch reference (interpreter on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_engine.attention import AttentionMetadata
from llm_engine.attention.reference import reference_paged_attention
from llm_engine.attention.triton_kernels import triton_paged_attention


def make_case(q_lens, seq_lens, h=4, hkv=2, d=16, bs=16, seed=0):
    """Random paged cache; block tables are shuffled so sequences' blocks are not contiguous."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-s // bs) for s in seq_lens]
    nb = sum(need) + 3
    perm = torch.randperm(nb, generator=g).tolist()
    tables, i = [], 0
    for n in need:
        tables.append(perm[i:i + n])
        i += n
    width = max(need)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    k = torch.randn(nb, bs, hkv, d, generator=g)
    v = torch.randn(nb, bs, hkv, d, generator=g)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    q = torch.randn(int(qsl[-1]), h, d, generator=g)
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), qsl, torch.tensor(seq_lens, dtype=torch.int32), bt,
                             max(q_lens), max(seq_lens))
    return q, k, v, meta


@pytest.mark.parametrize("seq_lens", [[1, 17, 40], [33, 5]])
def test_decode_kernel_matches_reference(seq_lens):
    q, k, v, meta = make_case([1] * len(seq_lens), seq_lens)
    ref = reference_paged_attention(q, k, v, meta, 0.25)
    assert torch.allclose(triton_paged_attention(q, k, v, meta, 0.25), ref, atol=1e-4)


def test_prefill_kernel_varlen_over_paged_prefix_matches_reference():
    # fresh prompt, chunk on top of a 20-token cached prefix, a decode, and a chunk spanning 2 query tiles
    q_lens, seq_lens = [7, 5, 1, 20], [7, 25, 30, 36]
    q, k, v, meta = make_case(q_lens, seq_lens, h=4, hkv=1, d=16)
    ref = reference_paged_attention(q, k, v, meta, 0.3)
    assert torch.allclose(triton_paged_attention(q, k, v, meta, 0.3), ref, atol=1e-4)


def test_engine_with_triton_backend_matches_torch_backend(tiny_llama):
    from llm_engine import EngineConfig, LLMEngine, SamplingParams

    path, _ = tiny_llama
    outs = []
    for backend in ("torch", "triton"):
        eng = LLMEngine(path, EngineConfig(num_kv_blocks=16, block_size=16, attention_backend=backend))
        eng.add_request(list(range(1, 21)), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        eng.add_request([5, 9, 2], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        res = {}
        while eng.has_unfinished():
            res.update({o.request_id: o.token_ids for o in eng.step() if o.finished})
        outs.append(res)
    assert outs[0] == outs[1]


def test_length_groups_split_short_from_long_contexts():
    from llm_engine.attention.reference import length_groups

    lens = np.array([600, 20, 30, 610, 25, 640])
    groups = length_groups(lens, overhead=100)
    assert sorted(map(sorted, (g.tolist() for g in groups))) == [[0, 3, 5], [1, 2, 4]]
    assert len(length_groups(lens, overhead=10**6)) == 1  # never worth an extra call
    assert sorted(np.concatenate(length_groups(np.array([5, 1, 9, 3]), overhead=0)).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("q_lens,seq_lens", [([1] * 6, [3, 70, 5, 66, 140, 9]),
                                             ([4, 1, 9, 1, 3], [4, 80, 100, 7, 50])])
def test_length_grouped_reference_equals_one_padded_batch(monkeypatch, q_lens, seq_lens):
    from llm_engine.attention import reference

    q, k, v, meta = make_case(q_lens, seq_lens)
    monkeypatch.setattr(reference, "GROUP_OVERHEAD", 10**9)
    one = reference_paged_attention(q, k, v, meta, 0.25)
    monkeypatch.setattr(reference, "GROUP_OVERHEAD", 0)
    meta.derived.clear()
    grouped = reference_paged_attention(q, k, v, meta, 0.25)
    assert len(meta.derived["groups"]) > 1
    torch.testing.assert_close(grouped, one, rtol=1e-5, atol=1e-5)
    assert torch.allclose(triton_paged_attention(q, k, v, meta, 0.25), grouped, atol=1e-4)

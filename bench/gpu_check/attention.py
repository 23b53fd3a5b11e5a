"""The Triton paged-attention kernels (decode; varlen prefill over a paged prefix) against the
PyTorch reference, and timed against ``scaled_dot_product_attention`` on the same shapes.

Correctness: the kernel's output (in the engine's dtype) against the reference computed in fp32 on
the same inputs, next to the reference's own error in the engine's dtype (the yardstick: what the
torch path itself loses to rounding). Speed: the kernel over the paged cache (block tables
shuffled, so no sequence's blocks are contiguous) against SDPA over contiguous ``[B, H, S, D]``
K/V of the same lengths, the layout a paged cache gives up; decode also reports the K/V bytes it
read per second against the device's memory bandwidth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.gpu_check.common import TOLERANCE, Setup, memory_bandwidth, result, rounded, time_ms
from llm_engine.attention import AttentionMetadata
from llm_engine.attention.reference import reference_paged_attention

BLOCK = 16


def paged_case(q_lens: list[int], seq_lens: list[int], h: int, hkv: int, d: int, dtype: torch.dtype,
               device: torch.device, seed: int = 0):
    """Random q and a paged K/V cache whose block tables are a shuffled permutation."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-s // BLOCK) for s in seq_lens]
    nb = sum(need) + 1
    perm = torch.randperm(nb, generator=g)
    width = max(need)
    bt = torch.zeros(len(need), width, dtype=torch.int32)
    i = 0
    for row, n in enumerate(need):
        bt[row, :n] = perm[i:i + n]
        i += n
    k = torch.randn(nb, BLOCK, hkv, d, generator=g).to(device, dtype)
    v = torch.randn(nb, BLOCK, hkv, d, generator=g).to(device, dtype)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    q = torch.randn(int(qsl[-1]), h, d, generator=g).to(device, dtype)
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long, device=device), qsl.to(device),
                             torch.tensor(seq_lens, dtype=torch.int32, device=device), bt.to(device),
                             max(q_lens), max(seq_lens))
    return q, k, v, meta


def _fresh(meta: AttentionMetadata) -> AttentionMetadata:
    """The same metadata without the per-step tensors a back end cached in it."""
    return AttentionMetadata(meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                             meta.max_query_len, meta.max_seq_len)


def _errors(setup: Setup, q, k, v, meta, scale: float) -> dict:
    from llm_engine.attention.triton_kernels import triton_paged_attention

    oracle = reference_paged_attention(q.float(), k.float(), v.float(), _fresh(meta), scale)
    if setup.perturb:
        oracle = oracle + 1.0
    got = triton_paged_attention(q, k, v, _fresh(meta), scale).float()
    ref = reference_paged_attention(q, k, v, _fresh(meta), scale).float()
    return {"max_abs_diff": float((got - oracle).abs().max()),
            "reference_max_abs_diff": float((ref - oracle).abs().max())}


def _dense(q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, b: int, s: int,
           q_len: int):
    """The same tensors laid out for SDPA: q ``[B, H, q_len, D]``, K/V ``[B, Hkv, S, D]`` contiguous."""
    hkv, d = k.shape[2], k.shape[3]
    bt = meta.block_tables.long()[:, : -(-s // BLOCK)].reshape(-1)
    kd = k.index_select(0, bt).view(b, -1, hkv, d)[:, :s].transpose(1, 2).contiguous()
    vd = v.index_select(0, bt).view(b, -1, hkv, d)[:, :s].transpose(1, 2).contiguous()
    qd = q_rows.view(b, q_len, q_rows.shape[1], d).transpose(1, 2).contiguous()
    return qd, kd, vd


def _timings(setup: Setup, q, k, v, meta, scale: float, b: int, s: int, q_len: int) -> dict:
    from llm_engine.attention.triton_kernels import triton_paged_attention

    qd, kd, vd = _dense(q, k, v, meta, b, s, q_len)
    causal = q_len > 1
    inner = 1 if setup.tiny else 10
    triton_ms = time_ms(setup, lambda: triton_paged_attention(q, k, v, meta, scale), inner=inner, warmup=2)
    sdpa_ms = time_ms(setup, lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=scale,
                                                                    enable_gqa=True), inner=inner, warmup=2)
    ref_ms = time_ms(setup, lambda: reference_paged_attention(q, k, v, _fresh(meta), scale), inner=inner, warmup=1)
    return {"triton_ms": rounded(triton_ms), "sdpa_ms": rounded(sdpa_ms), "torch_reference_ms": rounded(ref_ms),
            "triton_over_sdpa": rounded(triton_ms / sdpa_ms)}


def _check(name: str, setup: Setup, ragged: tuple[list[int], list[int]], uniform: tuple[int, int, int],
           heads: tuple[int, int, int]) -> dict:
    h, hkv, d = heads
    scale = d ** -0.5
    dtype = setup.dtype
    tol = TOLERANCE[dtype]
    cases = {}
    q, k, v, meta = paged_case(*ragged, h, hkv, d, dtype, setup.device, seed=setup.seed)
    cases["ragged"] = _errors(setup, q, k, v, meta, scale) | {"q_lens": ragged[0][:8], "seq_lens": ragged[1][:8]}
    b, q_len, s = uniform
    q, k, v, meta = paged_case([q_len] * b, [s] * b, h, hkv, d, dtype, setup.device, seed=setup.seed + 1)
    cases["uniform"] = _errors(setup, q, k, v, meta, scale) | {"batch": b, "q_len": q_len, "seq_len": s}
    timing = _timings(setup, q, k, v, meta, scale, b, s, q_len)
    if q_len == 1:  # decode reads every K/V byte once: report it against the memory bandwidth
        bw, source = memory_bandwidth(setup)
        kv_bytes = 2 * b * s * hkv * d * k.element_size()
        timing["triton_gb_s"] = rounded(kv_bytes / (timing["triton_ms"] / 1000) / 1e9)
        timing["fraction_of_bandwidth"] = rounded(kv_bytes / (timing["triton_ms"] / 1000) / bw)
        timing["bandwidth_source"] = source
    worst = max(c["max_abs_diff"] for c in cases.values())
    if not setup.cuda:
        timing["timing_note"] = "TRITON_INTERPRET=1: the kernel's time is the interpreter's, not a GPU's"
    return result(name, setup, worst <= tol, (
        "llm_engine.attention.reference (torch) in fp32 on the same inputs; time: "
        "torch.nn.functional.scaled_dot_product_attention on contiguous K/V of the uniform case"),
        dtype=str(dtype).removeprefix("torch."), heads=h, kv_heads=hkv, head_dim=d, max_abs_diff=worst,
        tolerance=tol, cases=cases, **timing)


def check_decode(setup: Setup) -> dict:
    """Decode kernel: one query per sequence over its paged context."""
    if setup.tiny:
        return _check("attention_decode", setup, ([1] * 3, [1, 17, 40]), (3, 1, 48), (4, 2, 16))
    g = torch.Generator().manual_seed(setup.seed)
    lens = torch.randint(1, 4097, (32,), generator=g).tolist()
    return _check("attention_decode", setup, ([1] * 32, lens), (32, 1, 2048), (32, 8, 128))


def check_prefill(setup: Setup) -> dict:
    """Varlen prefill kernel: fresh prompts, chunks over a cached prefix and decodes in one launch."""
    if setup.tiny:
        return _check("attention_prefill", setup, ([7, 5, 1, 20], [7, 25, 30, 36]), (2, 16, 16), (4, 2, 16))
    return _check("attention_prefill", setup, ([700, 512, 1, 300, 64], [700, 612, 1500, 333, 2112]),
                  (4, 1024, 1024), (32, 8, 128))

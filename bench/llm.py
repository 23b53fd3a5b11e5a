"""``headwater bench llm``: continuous batching vs ``transformers.generate`` static batches.

A random Llama-style model (~20M parameters on CPU, ~1B on CUDA) serves N requests whose prompt
and output lengths come from a seeded distribution, all submitted at once: prompts uniform in
``--prompt-len``, outputs log-normal (``exp(N(ln median, sigma^2))``, clipped to
``[--output-min, --output-max]``): most short, a few long, as in chat traffic. The baseline runs
the same token ids through ``generate()`` in static batches of ``max_num_seqs`` (left-padded,
``use_cache=True``, same dtype, threads and weights, greedy); a static batch lasts until its
longest request is done (the random model has no EOS), which is how static batching behaves.
Both sides produce exactly the requested output tokens; tokens/s counts those. Both run with the
same number of torch threads (``--threads``, 1 by default: on a shared machine extra threads spin
against other work). Wall-clock and process-CPU speedups are both reported. ``--repeats N`` runs
both sides N times, interleaved, and reports each side's median run.

Ceiling (``ceiling_decode_steps_per_s``): the decode roofline, every step reading all weights once
at the memory bandwidth: the card's peak HBM bandwidth on a GPU the table below knows (then
``fraction_of_ceiling`` is the ``decode_roofline_fraction`` it always reported), else the copy
bandwidth measured in this run (``memory_bandwidth_gb_s``).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import numpy as np
import torch

from bench.harness import Ceiling, add_common, add_threads, with_ceiling

logger = logging.getLogger(__name__)
PEAK_HBM = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L4": 0.3e12, "A10": 0.6e12}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=16, help="engine max_num_seqs = baseline batch size")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 128), help="uniform range")
    p.add_argument("--output-median", type=float, default=48.0, help="log-normal median of output lengths")
    p.add_argument("--output-sigma", type=float, default=1.2, help="log-normal sigma of output lengths")
    p.add_argument("--output-min", type=int, default=4)
    p.add_argument("--output-max", type=int, default=512)
    p.add_argument("--device", default="auto")
    add_threads(p, "torch CPU threads for both sides (0 = torch's default); on a shared machine more "
                   "than one thread spins against other work and slows both sides erratically")
    p.add_argument("--no-speculative", action="store_true", help="engine without n-gram speculation")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--preemption-mode", choices=("recompute", "swap"), default="recompute")
    p.add_argument("--kv-cache-mib", type=int, default=128,
                   help="KV pool on CPU, MiB (small values force preemption: compare --preemption-mode)")
    p.add_argument("--cuda-graphs", action="store_true", help="CUDA graphs for decode steps (CUDA only)")
    add_common(p, repeats=1, repeats_help="runs of the engine and the baseline, interleaved (median run)",
               seed_help="seed of the workload and the weights")


def model_shape(cuda: bool) -> dict:
    if cuda:  # ~1.1B
        return dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                    num_attention_heads=32, num_key_value_heads=4)
    return dict(vocab_size=16000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                num_attention_heads=6, num_key_value_heads=2)


def workload(args) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(args.seed)
    n = args.num_requests
    plens = rng.integers(args.prompt_len[0], args.prompt_len[1] + 1, n)
    olens = np.clip(rng.lognormal(np.log(args.output_median), args.output_sigma, n).astype(int),
                    args.output_min, args.output_max)
    prompts = [rng.integers(10, 15000, int(k)).tolist() for k in plens]
    return prompts, olens.tolist()


def run_engine(path, prompts, olens, args, device) -> dict:
    from llm_engine import EngineConfig, LLMEngine, SamplingParams

    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=512, device=device,
                       kv_cache_bytes=args.kv_cache_mib << 20, dtype="auto", speculative=not args.no_speculative,
                       preemption_mode=args.preemption_mode, cuda_graphs=args.cuda_graphs)
    eng = LLMEngine(path, cfg)
    eng.add_request([1, 2, 3], SamplingParams(max_tokens=2))  # warm-up
    while eng.has_unfinished():
        eng.step()
    eng.pool.peak_used = eng.pool.num_used
    t0, c0 = time.perf_counter(), time.process_time()
    for p, o in zip(prompts, olens):
        eng.add_request(p, SamplingParams(max_tokens=o, temperature=0, ignore_eos=True))
    steps = 0
    produced = 0
    while eng.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in eng.step())
        steps += 1
    if device == "cuda":
        torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    if produced != sum(olens):
        raise RuntimeError(f"engine produced {produced} tokens, {sum(olens)} asked")
    return dict(seconds=dt, cpu_seconds=cpu, tokens=produced, steps=steps, peak_blocks=eng.pool.peak_used,
                num_blocks=eng.pool.num_blocks, preemptions=eng.scheduler.num_preemptions,
                swaps_out=eng.scheduler.num_swaps_out, swaps_in=eng.scheduler.num_swaps_in)


def run_baseline(path, prompts, olens, batch: int, device) -> dict:
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    hf.generation_config.pad_token_id = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(prompts), batch):
        ps, os_ = prompts[i:i + batch], olens[i:i + batch]
        width = max(len(p) for p in ps)
        ids = torch.zeros(len(ps), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(ps):  # left padding
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        with torch.no_grad():
            hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(os_),
                        min_new_tokens=max(os_), do_sample=False)
    if device == "cuda":
        torch.cuda.synchronize()
    return dict(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0, tokens=sum(olens))


def run(args: argparse.Namespace) -> dict:
    before = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(before)


def _run(args: argparse.Namespace) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    shape = model_shape(device == "cuda")
    prompts, olens = workload(args)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(args.seed)
        cfg = LlamaConfig(**shape, max_position_embeddings=1024, tie_word_embeddings=False,
                          eos_token_id=None, bos_token_id=None, pad_token_id=None)
        model = LlamaForCausalLM(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        engine_runs, base_runs = [], []
        for _ in range(max(1, args.repeats)):
            engine_runs.append(run_engine(tmp, prompts, olens, args, device))
            if not args.skip_baseline:
                base_runs.append(run_baseline(tmp, prompts, olens, args.max_num_seqs, device))
        ours = _median_run(engine_runs)
        base = _median_run(base_runs) if base_runs else None
    out = {
        "benchmark": "llm", "device": device, "params": n_params, "num_requests": len(prompts),
        "max_num_seqs": args.max_num_seqs, "threads": torch.get_num_threads(),
        "speculative": not args.no_speculative, "preemption_mode": args.preemption_mode,
        "cuda_graphs": args.cuda_graphs,
        "prompt_len_uniform": list(args.prompt_len),
        "output_len_lognormal": {"median": args.output_median, "sigma": args.output_sigma,
                                 "min": args.output_min, "max": args.output_max, "seed": args.seed},
        "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(olens),
        "seconds": round(ours["seconds"], 3), "cpu_seconds": round(ours["cpu_seconds"], 3),
        "tokens_per_s": round(ours["tokens"] / ours["seconds"], 1),
        "requests_per_s": round(len(prompts) / ours["seconds"], 3),
        "steps": ours["steps"], "kv_peak_blocks": ours["peak_blocks"], "kv_num_blocks": ours["num_blocks"],
        "preemptions": ours["preemptions"], "swaps_out": ours["swaps_out"], "swaps_in": ours["swaps_in"],
    }
    if base:
        out |= {
            "baseline_seconds": round(base["seconds"], 3), "baseline_cpu_seconds": round(base["cpu_seconds"], 3),
            "baseline_tokens_per_s": round(base["tokens"] / base["seconds"], 1),
            "baseline_requests_per_s": round(len(prompts) / base["seconds"], 3),
            "speedup_vs_baseline": round(base["seconds"] / ours["seconds"], 2),
            # CPU seconds (all threads): steadier than wall time when other work shares the cores
            "cpu_speedup_vs_baseline": round(base["cpu_seconds"] / ours["cpu_seconds"], 2),
        }
    bandwidth, source = None, "measured"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_HBM.items() if k in name), None)
        bytes_w = n_params * 2
        # decode roofline: every step reads all weights once; KV read is small next to 2 GB of weights
        if peak:
            out["decode_roofline_fraction"] = round((bytes_w * ours["steps"] / ours["seconds"]) / peak, 3)
            bandwidth, source = peak, f"{name} peak HBM"
        out["gpu"] = name
    else:
        bytes_w = n_params * 4  # float32 on CPU (EngineConfig dtype "auto")
    if bandwidth is None:
        bandwidth = memory_bandwidth(device)
    out["memory_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
    out["decode_steps_per_s"] = round(ours["steps"] / ours["seconds"], 2)
    out["repeats"] = max(1, args.repeats)
    ceiling = Ceiling(bandwidth / bytes_w, "steps/s", measured=ours["steps"] / ours["seconds"], note=(
        f"decode roofline: every engine step reads all {bytes_w / 1e6:.0f} MB of weights once at "
        f"the memory bandwidth ({source}, {bandwidth / 1e9:.0f} GB/s); prefill chunks and "
        "sampling make steps slower than that"))
    return with_ceiling(out, ceiling, named="ceiling_decode_steps_per_s", digits=2)


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def memory_bandwidth(device: str, mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s of a plain tensor copy (read + write) on ``device``, best of ``repeats``."""
    n = (mib << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy faults the pages in
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best

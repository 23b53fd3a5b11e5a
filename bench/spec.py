"""``headwater bench spec --json``: n-gram speculative decoding vs plain decoding, same run.

The workload copies spans of its input (repeat a passage, edit code, quote a source), where
drafts from the request's own text are often right; greedy outputs must be identical with and
without speculation. A second workload (free writing, drafts rarely match) checks that adaptive
draft length costs nothing there: ``nomatch_speedup`` should stay >= 0.95.

No ceiling is measured (``ceiling: null``): speculation's bound is the workload's acceptance (how
much of the output the prompt already holds), not the machine's; plain decoding's machine bound
is ``headwater bench llm``'s decode roofline.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from bench.harness import add_common, add_threads, no_ceiling, with_ceiling
from llm_engine.spec.adaptive import SpecConfig

log = logging.getLogger(__name__)

PASSAGE = (
    "The river rises in the northern hills, runs south through three market towns, and meets the sea at a "
    "wide estuary where fishing boats shelter in winter. Its water powered the first mills of the region."
)
CODE = (
    "def total_price(items, tax_rate):\n"
    "    subtotal = 0\n"
    "    for item in items:\n"
    "        subtotal += item.price * item.quantity\n"
    "    return subtotal * (1 + tax_rate)\n"
)
COPY_PROMPTS = [
    f"Repeat the following text exactly, word for word:\n\n{PASSAGE}",
    f"Rename the function total_price to compute_total in this code and show the whole code:\n\n{CODE}",
]
FREE_PROMPTS = ["Write a short poem about a lighthouse keeper who befriends a seagull."]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct, converted once)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--backend", choices=["engine", "reference"], default="engine")
    parser.add_argument("--max-draft", type=int, default=8)
    add_threads(parser)
    parser.add_argument("--skip-nomatch", action="store_true", help="only the copy workload")
    add_common(parser, repeats=2, repeats_help="runs per prompt and mode (fastest counts)",
               seed_help="torch seed (greedy decoding: outputs do not depend on it)")


def _chat(prompt: str, tokenizer) -> list[int]:  # noqa: ANN001
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer.encode(text).ids


def _compare(generate, prompts: list[list[int]], mode: str, repeats: int) -> dict:  # noqa: ANN001
    """Plain decoding and ``mode`` ("spec", or "wrong": drafts that never match) on every prompt,
    interleaved, ``repeats`` times each; the fastest run of each counts (the machine is shared:
    the minimum is the least disturbed measurement)."""
    base_t, spec_t, base_out, spec_out = 0.0, 0.0, [], []
    drafted = accepted = 0
    for ids in prompts:
        best = {"plain": float("inf"), mode: float("inf")}
        outs: dict = {}
        for r in range(repeats):
            for m in ("plain", mode):
                t = time.perf_counter()
                out, d, a = generate(ids, m)
                best[m] = min(best[m], time.perf_counter() - t)
                if r == 0:
                    outs[m] = out
                    drafted += d
                    accepted += a
        base_out.append(outs["plain"])
        spec_out.append(outs[mode])
        base_t += best["plain"]
        spec_t += best[mode]
    tokens = sum(map(len, base_out))
    return {
        "tokens_per_s": tokens / spec_t,
        "baseline_tokens_per_s": tokens / base_t,
        "speedup": base_t / spec_t,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "drafted_tokens": drafted,
        "identical": base_out == spec_out,
        "output_tokens": tokens,
    }


def run(args: argparse.Namespace) -> dict:
    from tokenizers import Tokenizer

    from llm_engine.convert import smollm2_path

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_dir = args.model or str(smollm2_path())
    tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    generate, backend = _generator(args, model_dir)
    copy = [_chat(p, tokenizer) for p in COPY_PROMPTS]
    free = [_chat(p, tokenizer) for p in FREE_PROMPTS]
    generate(copy[0][:16], "plain")  # warm-up
    result = {"bench": "spec", "backend": backend, "model": str(model_dir), "threads": torch.get_num_threads()}

    def add(prefix: str, res: dict) -> None:
        result.update({f"{prefix}{k}": round(v, 3) if isinstance(v, float) else v for k, v in res.items()})

    add("", _compare(generate, copy, "spec", args.repeats))
    if not args.skip_nomatch:
        add("freetext_", _compare(generate, free, "spec", args.repeats))
        if backend == "engine":
            add("nomatch_", _compare(generate, free, "wrong", args.repeats))
    result["repeats"] = args.repeats
    return with_ceiling(result, no_ceiling(
        "none measured: speculation is bounded by the workload's acceptance (how much of the output "
        "the prompt already holds), not by the machine; plain decoding's machine bound is bench "
        "llm's decode roofline", "tokens/s"))


def _generator(args: argparse.Namespace, model_dir: str):  # noqa: ANN202
    if args.backend == "engine":
        return _engine_generator(model_dir, args.max_tokens, args.max_draft), "engine"
    from llm_engine.reference import ReferenceRunner

    runner = ReferenceRunner(model_dir)
    eos = runner.config.eos_token_id
    stops = eos if isinstance(eos, list) else [eos]

    spec = SpecConfig(max_draft=args.max_draft)

    def generate(ids: list[int], mode: str) -> tuple[list[int], int, int]:
        out, d, a = [], 0, 0
        for step in runner.generate(ids, args.max_tokens, stop_token_ids=stops, spec=spec if mode == "spec" else None):
            out += step.token_ids
            d += step.drafted
            a += step.accepted
        return out, d, a

    return generate, "reference"


def _engine_generator(model_dir: str, max_tokens: int, max_draft: int):  # noqa: ANN202
    """Greedy generation on engines over the same weights: speculation off, on, and on with
    drafts that never match (each draft token shifted by one id: the adaptive draft length must
    bring the cost of failing drafts down to nothing)."""
    from llm_engine import EngineConfig, LLMEngine, SamplingParams

    from llm_engine.spec.engine_hooks import EngineSpeculation

    # One engine (same weights, same memory) in three modes: the timing differences are the modes'.
    engine = LLMEngine(model_dir, EngineConfig(speculative=False, kv_cache_bytes=64 << 20))
    config = SpecConfig(max_draft=max_draft)
    modes = {"plain": None, "spec": EngineSpeculation(engine, config), "wrong": EngineSpeculation(engine, config)}
    wrong = modes["wrong"].proposer
    vocab = engine.model.config.vocab_size
    right_propose = wrong.propose
    wrong.propose = lambda *a, **k: [[(t + 1) % vocab for t in d] for d in right_propose(*a, **k)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    calls = iter(range(1 << 30))

    def generate(ids: list[int], mode: str) -> tuple[list[int], int, int]:
        engine.spec = modes[mode]
        ctl = engine.spec.proposer.controller if engine.spec is not None else None
        before = (ctl.total_proposed, ctl.total_accepted) if ctl else (0, 0)
        rid = engine.add_request(ids, params, request_id=f"b{next(calls)}")
        out: list[int] = []
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id == rid and o.finished:
                    out = o.token_ids
        after = (ctl.total_proposed, ctl.total_accepted) if ctl else (0, 0)
        return out, after[0] - before[0], after[1] - before[1]

    return generate

"""``headwater bench spec --json``: n-gram speculative decoding vs plain decoding, same run.

The workload copies spans of its input (repeat a passage, edit code, quote a source), where
drafts from the request's own text are often right; greedy outputs must be identical with and
without speculation. A second workload (free writing, drafts rarely match) checks that adaptive
draft length costs nothing there: ``nomatch_speedup`` should stay >= 0.95.
"""

from __future__ import annotations

import argparse
import logging
import time

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
    parser.add_argument("--skip-nomatch", action="store_true", help="only the copy workload")


def _chat(prompt: str, tokenizer) -> list[int]:  # noqa: ANN001
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer.encode(text).ids


def _run_workload(generate, prompts: list[list[int]], spec: SpecConfig | None) -> tuple[float, list[list[int]], int, int]:  # noqa: ANN001
    tokens, outs, drafted, accepted = 0, [], 0, 0
    start = time.perf_counter()
    for ids in prompts:
        out, d, a = generate(ids, spec)
        outs.append(out)
        tokens += len(out)
        drafted += d
        accepted += a
    return tokens / (time.perf_counter() - start), outs, drafted, accepted


def run(args: argparse.Namespace) -> dict:
    from tokenizers import Tokenizer

    from llm_engine.gguf_reference import smollm2_dir

    model_dir = args.model or str(smollm2_dir())
    tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    generate, backend = _generator(args, model_dir)
    spec = SpecConfig(max_draft=args.max_draft)
    copy = [_chat(p, tokenizer) for p in COPY_PROMPTS]
    generate(copy[0][:16], None)  # warm-up
    base_tps, base_out, _, _ = _run_workload(generate, copy, None)
    spec_tps, spec_out, drafted, accepted = _run_workload(generate, copy, spec)
    result = {
        "bench": "spec",
        "backend": backend,
        "model": str(model_dir),
        "tokens_per_s": round(spec_tps, 2),
        "baseline_tokens_per_s": round(base_tps, 2),
        "speedup": round(spec_tps / base_tps, 3),
        "acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0,
        "drafted_tokens": drafted,
        "identical": spec_out == base_out,
        "output_tokens": sum(map(len, base_out)),
    }
    if not args.skip_nomatch:
        free = [_chat(p, tokenizer) for p in FREE_PROMPTS]
        nb, nb_out, _, _ = _run_workload(generate, free, None)
        ns, ns_out, nd, na = _run_workload(generate, free, spec)
        result.update({
            "nomatch_tokens_per_s": round(ns, 2),
            "nomatch_baseline_tokens_per_s": round(nb, 2),
            "nomatch_speedup": round(ns / nb, 3),
            "nomatch_acceptance_rate": round(na / nd, 3) if nd else 0.0,
            "nomatch_identical": ns_out == nb_out,
        })
    return result


def _generator(args: argparse.Namespace, model_dir: str):  # noqa: ANN202
    if args.backend == "engine":
        try:
            from llm_engine.spec_engine import engine_generator
        except ImportError:
            log.warning("engine speculation path unavailable; using the reference runner")
        else:
            return engine_generator(model_dir, args.max_tokens), "engine"
    from llm_engine.reference import ReferenceRunner

    runner = ReferenceRunner(model_dir)
    eos = runner.config.eos_token_id
    stops = eos if isinstance(eos, list) else [eos]

    def generate(ids: list[int], spec: SpecConfig | None) -> tuple[list[int], int, int]:
        out, d, a = [], 0, 0
        for step in runner.generate(ids, args.max_tokens, stop_token_ids=stops, spec=spec):
            out += step.token_ids
            d += step.drafted
            a += step.accepted
        return out, d, a

    return generate, "reference"

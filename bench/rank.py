"""``headwater bench rank --json``: ranking with the shared context computed once vs a full
forward per candidate, on the same weights in the same run.

Default workload: a random ~20M-parameter Llama, one 512-token context, 100 candidates of ~16
tokens. ``ms_per_call`` is the shared-prefix path (context prefilled once, candidates batched
over its KV, log-probs gathered for candidate tokens only); ``naive_ms_per_call`` runs the model
on context + candidate for each candidate and takes ``log_softmax`` of its full logits.
``max_abs_diff`` says the two agree. ``--device`` (default: CUDA when there is one) puts both
sides on one device, both in fp32.

Ceiling (``ceiling_ms_per_call``, a floor against ``ms_per_call``): the compute no ranking of this
workload can skip, measured in the same run on the same weights (the transformers model of the
reference path, same threads): every token (context once, then each candidate's) through the
model body once, and the output head with ``log_softmax`` at the candidates' target positions
only. The engine's own model may beat that bound slightly; a fraction near 1 means nothing is left.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

from bench.harness import Ceiling, add_common, add_threads, timed, with_ceiling
from llm_engine.scoring import ScoringItem, ScoringOptions, plan_loglik, ranking_of, reduce_scores, score_items

log = logging.getLogger(__name__)

BENCH_MODEL = dict(layers=8, hidden=256, heads=8, kv_heads=4, intermediate=768, vocab_size=32000)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model folder (default: a random ~20M-param Llama)")
    parser.add_argument("--context-tokens", type=int, default=512)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--candidate-tokens", type=int, default=16, help="mean candidate length (+-25%%)")
    parser.add_argument("--batch", type=int, default=50, help="candidates per forward on the shared-prefix path")
    parser.add_argument("--step-tokens", type=int, default=2048, help="engine token budget per step")
    parser.add_argument("--backend", choices=["engine", "reference"], default="engine",
                        help="engine: the scheduler + paged KV path; reference: transformers with a reused cache")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda or auto (cuda when there is one): both sides, in fp32, on this device")
    add_threads(parser)
    add_common(parser, repeats=3, repeats_help="timed calls per method (median reported)",
               seed_help="seed of the random model and the workload")


def workload(vocab: int, context_tokens: int, candidates: int, mean_len: int, seed: int) -> tuple[list[int], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(3, vocab, (context_tokens,), generator=g).tolist()
    lo, hi = max(1, int(mean_len * 0.75)), max(2, int(mean_len * 1.25) + 1)
    lens = torch.randint(lo, hi, (candidates,), generator=g).tolist()
    return ctx, [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


@torch.no_grad()
def naive_scores(model: torch.nn.Module, items: list[ScoringItem], options: ScoringOptions) -> torch.Tensor:
    """One plain forward per candidate, ``log_softmax`` over all its logits, then gather."""
    per_token = []
    dev = model.device
    for it in items:
        logp = torch.log_softmax(model(torch.tensor([it.token_ids], device=dev)).logits[0].float(), -1)
        per_token.append(logp[it.target_positions].gather(1, torch.tensor(it.target_ids, device=dev)).cpu())
    seg = torch.repeat_interleave(torch.arange(len(items)), torch.tensor([it.num_targets for it in items]))
    return reduce_scores(torch.cat(per_token), seg, len(items), options)


@torch.no_grad()
def every_token_once(model: torch.nn.Module, ctx: list[int], cands: list[list[int]]) -> torch.Tensor:
    """The floor of any ranking: all tokens through the body once (in chunks the model's
    positions allow), the head and ``log_softmax`` at the candidates' target positions only."""
    tokens = ctx + [t for c in cands for t in c]
    limit = model.config.max_position_embeddings
    body = model.get_decoder()
    hidden = torch.cat([body(torch.tensor([tokens[i:i + limit]], device=model.device)).last_hidden_state[0]
                        for i in range(0, len(tokens), limit)])
    targets = sum(map(len, cands))
    return torch.log_softmax(model.get_output_embeddings()(hidden[-targets:]).float(), -1)


def run(args: argparse.Namespace) -> dict:
    from llm_engine.random_model import build_random_llama
    from llm_engine.reference import ReferenceRunner

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    model_dir = args.model
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="hw-bench-rank-")
        model_dir = build_random_llama(Path(tmp.name), seed=args.seed, max_positions=2048, **BENCH_MODEL)
    try:
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if device != "cpu" and args.backend == "reference":
            raise ValueError("--backend reference runs on the CPU only")
        runner = ReferenceRunner(model_dir)
        model = runner.model.to(device)
        params = sum(p.numel() for p in model.parameters())
        ctx, cands = workload(model.config.vocab_size, args.context_tokens, args.candidates, args.candidate_tokens, args.seed)
        items = plan_loglik(ctx, cands)
        options = ScoringOptions(normalize="mean")
        head = model.get_output_embeddings()
        weight = head.weight.detach()
        fast_fn, backend = _fast_scorer(args, model_dir, runner, items, options, weight, device)
        fast_s, _, fast = timed(fast_fn, args.repeats, warmup=1)  # warm-up: allocations, first-call paths
        naive_s, _, naive = timed(lambda: naive_scores(model, items, options), max(1, args.repeats // 2), warmup=0)
        ms, naive_ms = fast_s * 1000, naive_s * 1000
        diff = float((torch.tensor(fast.scores, dtype=torch.float64) - naive).abs().max())
        floor_s, _, _ = timed(lambda: _synced(every_token_once(model, ctx, cands)), args.repeats)
        ceiling = Ceiling(floor_s * 1000, "ms/call", measured=ms, lower_is_better=True, note=(
            "a floor (lower is better; the fraction is floor / ms_per_call): every token through "
            "the model body once and the head at target positions only, same weights and threads"))
        return with_ceiling({
            "bench": "rank",
            "backend": backend,
            "model_params": params,
            "context_tokens": len(ctx),
            "candidates": len(cands),
            "candidate_tokens": sum(map(len, cands)),
            "ms_per_call": round(ms, 2),
            "naive_ms_per_call": round(naive_ms, 2),
            "speedup": round(naive_ms / ms, 2),
            "max_abs_diff": diff,
            "same_ranking": fast.ranking == ranking_of(naive),
            "threads": torch.get_num_threads(), "device": device,
            "repeats": args.repeats, "seed": args.seed,
        }, ceiling, named="ceiling_ms_per_call", digits=2)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _synced(out: torch.Tensor) -> torch.Tensor:
    """``out`` once the device has computed it: a timing on CUDA must not stop at the launch."""
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return out


def _fast_scorer(args, model_dir, runner, items, options, weight, device):  # noqa: ANN001, ANN202
    if args.backend == "engine":
        from llm_engine import EngineConfig, LLMEngine
        from llm_engine.ranking import score_sync

        engine = LLMEngine(model_dir, EngineConfig(max_num_batched_tokens=args.step_tokens, device=device,
                                                   dtype="float32",  # the naive side's dtype
                                                   max_num_seqs=max(args.candidates, 64)))
        calls = iter(range(1 << 30))
        return (lambda: score_sync(engine, items, options, f"bench-{next(calls)}")), "engine"
    return (lambda: score_items(items, lambda it: runner.hidden_shared_prefix(it, batch=args.batch), weight, options),
            "reference")

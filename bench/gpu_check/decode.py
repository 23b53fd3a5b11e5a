"""Decode through captured CUDA graphs vs eager: the same greedy tokens, and the step time each way.

Tokens, in fp32 (rounding that differs between batch shapes stays far below the gap between the
top two logits): plain eager decode is the reference; the padded buckets of
:mod:`llm_engine.decode_graphs` run eagerly (``eager_step``) and through captured graphs
(``CudaGraphCapture``, CUDA only) must give the same tokens, for a batch that shrinks through
every bucket. ``*_diverged`` lists where a request first differs: a late near-tie flip reads
differently from a broken bucket, which differs from its first decode step.

Step time (the engine's dtype): the median engine step of a pure-decode batch at batch 1 and at
the largest bucket, eager vs graphs; without CUDA the padded eager path stands in for the graph
and the line says the capture was skipped.
"""

from __future__ import annotations

import time

import torch

from bench.gpu_check.common import Setup, model_folder, result, rounded
from llm_engine import EngineConfig, LLMEngine, SamplingParams
from llm_engine.config import ModelConfig
from llm_engine.decode_graphs import capture_sizes, eager_step
from llm_engine.model.loader import load_model


def engine(setup: Setup, model, dtype: torch.dtype, seqs: int, graph_batch: int | None, blocks: int) -> LLMEngine:
    """An engine over the loaded ``model`` (shared by every engine of the check); CUDA graphs for
    decode batches up to ``graph_batch`` when it is given."""
    cfg = EngineConfig(device=setup.device.type, dtype=str(dtype).removeprefix("torch."), speculative=False,
                       max_num_seqs=seqs, max_num_batched_tokens=min(4096, blocks * 16), num_kv_blocks=blocks,
                       attention_backend="triton" if setup.cuda else "torch", cuda_graphs=graph_batch is not None,
                       cuda_graph_max_batch=graph_batch or 1, max_model_len=1024)
    return LLMEngine(model, cfg)


def greedy(eng: LLMEngine, prompts: list[list[int]], lens: list[int]) -> list[list[int]]:
    ids = [eng.add_request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
           for p, n in zip(prompts, lens)]
    out: dict[str, list[int]] = {}
    while eng.has_unfinished():
        out.update({o.request_id: o.token_ids for o in eng.step() if o.finished})
    return [out[i] for i in ids]


def step_ms(eng: LLMEngine, batch: int, prompt_len: int, steps: int, vocab: int) -> float:
    """Median wall time of the engine's pure-decode steps for ``batch`` sequences (the first
    step prefills every prompt and is not counted). ``step()`` returns token ids to the host, so
    each step is synchronous."""
    for i in range(batch):
        eng.add_request([(31 * i + 7 * j) % (vocab - 3) + 3 for j in range(prompt_len)],
                        SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True))
    eng.step()
    times = []
    while eng.has_unfinished():
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1000


def diverged(got: list[list[int]], want: list[list[int]]) -> list[list[int]]:
    """``[request, first differing position]`` of each request whose tokens differ (a near-tie
    flipped late reads differently from a broken bucket that differs from the first token)."""
    return [[i, next(j for j, (x, y) in enumerate(zip(g, w)) if x != y)]
            for i, (g, w) in enumerate(zip(got, want)) if g != w]


def check_decode_graphs(setup: Setup) -> dict:
    folder = model_folder(setup, "tiny" if setup.tiny else "smollm2")
    max_batch = 4 if setup.tiny else 32
    n_req = 6 if setup.tiny else 34  # > max_batch: the first decode steps run unpadded
    vocab = ModelConfig.from_pretrained(folder.path).vocab_size
    prompts = [[(7 * i + 3 * j) % (vocab - 3) + 3 for j in range(5 + 2 * i)] for i in range(n_req)]
    top = 12 if setup.tiny else 24
    lens = [max(2, top * (i + 1) // n_req) for i in range(n_req)]  # the batch shrinks through every bucket
    blocks = sum(-(-(len(p) + n) // 16) for p, n in zip(prompts, lens)) + 8

    fp32 = load_model(folder.path, torch.float32, setup.device)
    plain = greedy(engine(setup, fp32, torch.float32, n_req, None, blocks), prompts, lens)
    setup.release()
    eng = engine(setup, fp32, torch.float32, n_req, None, blocks)
    eng.pad_decode(eager_step, max_batch)
    padded = greedy(eng, prompts, lens)
    buckets_used = {b: n for b, n in eng.runner.decode.runs.items() if n}
    del eng
    setup.release()
    graph = None
    if setup.cuda:
        graph = greedy(engine(setup, fp32, torch.float32, n_req, max_batch, blocks), prompts, lens)
        setup.release()
    del fp32
    reference = plain
    if setup.perturb:
        reference = [[t + 1 for t in seq] for seq in plain]
    tokens = {"padded_eager_identical": padded == reference, "padded_eager_diverged": diverged(padded, reference),
              "graph_identical": None if graph is None else graph == reference,
              "graph_diverged": None if graph is None else diverged(graph, reference),
              "graph_equals_padded_eager": None if graph is None else graph == padded}
    same = padded == reference and (graph is None or graph == reference)

    model = load_model(folder.path, setup.dtype, setup.device)
    steps = 8 if setup.tiny else 64
    prompt_len = 8 if setup.tiny else 32
    blocks = max_batch * (-(-(prompt_len + steps + 2) // 16)) + 8
    timing: dict[str, dict[str, float | None]] = {"eager": {}, "graph" if setup.cuda else "padded_eager": {}}
    for batch in (1, max_batch):
        eng = engine(setup, model, setup.dtype, max_batch, None, blocks)
        timing["eager"][str(batch)] = rounded(step_ms(eng, batch, prompt_len, steps, vocab))
        del eng
        setup.release()
    if setup.cuda:
        eng = engine(setup, model, setup.dtype, max_batch, max_batch, blocks)
    else:
        eng = engine(setup, model, setup.dtype, max_batch, None, blocks)
        eng.pad_decode(eager_step, max_batch)
    other = "graph" if setup.cuda else "padded_eager"
    for batch in (1, max_batch):
        timing[other][str(batch)] = rounded(step_ms(eng, batch, prompt_len, steps, vocab))
    del eng, model
    setup.release()
    speedup = {b: rounded(timing["eager"][b] / timing[other][b]) for b in timing["eager"]}
    return result("decode_graphs", setup, same, (
        "plain eager decode's greedy tokens (fp32); step time: the same engine without graphs"),
        model=folder.label, requests=n_req, max_tokens=lens[-1], capture_sizes=capture_sizes(max_batch),
        buckets_run=buckets_used, tokens=tokens,
        capture=({"ran": True} if setup.cuda else {"ran": False, "skipped": "no CUDA: graph capture and replay need "
                                                   "a GPU; the padded buckets ran eagerly (eager_step) instead"}),
        step_ms=timing, step_dtype=str(setup.dtype).removeprefix("torch."), steps_timed=steps,
        **{f"{other}_speedup": speedup})

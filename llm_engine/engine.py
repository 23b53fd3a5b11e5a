"""The synchronous engine: requests in, one scheduler step at a time, outputs out.

``step()`` runs five phases, each a method passing a typed record (:mod:`llm_engine.step`) on:
schedule (drafts, the scheduler's decision, KV swaps for swap preemption) -> prepare inputs and
run the model -> sample the rows that reached their sequence's end and verify drafts -> append
tokens, check stop conditions, free finished requests' blocks, register newly full blocks for
prefix caching. Speculation is called at named points through :class:`SpeculationHooks`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from llm_engine.block_pool import BlockPool
from llm_engine.prefix_hash import PrefixHasher
from llm_engine.config import AttentionBackend, EngineConfig, ModelConfig, PreemptionMode
from llm_engine.decode_graphs import CudaGraphCapture, StepFn
from llm_engine.kv_cache import KVCacheManager, allocate_kv_cache, num_blocks_for_budget
from llm_engine.model.llama import LlamaForCausalLM
from llm_engine.model.loader import load_model
from llm_engine.model_runner import ModelRunner
from llm_engine.outputs import RequestOutput
from llm_engine.ranking import ScoringManager
from llm_engine.spec.adaptive import SpecConfig
from llm_engine.spec.engine_hooks import EngineSpeculation
from llm_engine.sampling import sample
from llm_engine.sampling_params import SamplingParams
from llm_engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from llm_engine.sequence import FinishReason, RequestKind, Sequence
from llm_engine.step import ForwardPass, SampledToken, SpeculationHooks, StepPlan, StepTokens, Verification
from llm_engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve(config: EngineConfig) -> tuple[torch.device, torch.dtype, AttentionBackend]:
    dev = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if config.dtype == "auto":
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    elif config.dtype in _DTYPES:
        dtype = _DTYPES[config.dtype]
    else:
        raise ValueError(f"unknown dtype {config.dtype!r}")
    if config.attention_backend not in tuple(AttentionBackend):
        raise ValueError(f"unknown attention backend {config.attention_backend!r}")
    backend = AttentionBackend(config.attention_backend)
    if backend is AttentionBackend.AUTO:
        backend = AttentionBackend.TRITON if dev == "cuda" else AttentionBackend.TORCH
    if config.cuda_graphs and (dev != "cuda" or backend is not AttentionBackend.TRITON):
        # The torch reference back end reads sequence lengths on the host, which capture forbids.
        raise ValueError(f"cuda_graphs needs device='cuda' and the triton attention backend "
                         f"(got device={dev!r}, attention_backend={backend.value!r})")
    return torch.device(dev), dtype, backend


class LLMEngine:
    """Continuous-batching engine over one model."""

    def __init__(self, model: LlamaForCausalLM | str | Path, config: EngineConfig | None = None,
                 tokenizer: Tokenizer | None = None):
        self.config = config = config or EngineConfig()
        device, dtype, backend = _resolve(config)
        weights = type(model).__name__
        if not isinstance(model, torch.nn.Module):
            path = Path(model)
            weights = str(path.resolve())
            tokenizer = tokenizer or (Tokenizer.from_pretrained(path) if (path / "tokenizer.json").exists() else None)
            model = load_model(path, dtype, device)
        self.model, self.tokenizer = model, tokenizer
        mc: ModelConfig = model.config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        block_shape = (config.block_size, mc.num_key_value_heads, mc.head_dim)
        n = config.num_kv_blocks
        if not n:
            budget = config.kv_cache_bytes
            if device.type == "cuda":
                budget = int(torch.cuda.mem_get_info(device)[0] * config.gpu_memory_utilization)
            n = num_blocks_for_budget(budget, mc.num_hidden_layers, block_shape, dtype)
        if n * config.block_size < min(self.max_model_len, config.max_num_batched_tokens):
            logger.warning("KV pool of %d blocks holds fewer tokens than one step", n)
        # Prefix-cache digests are namespaced by everything that changes the KV for equal tokens.
        hasher = PrefixHasher.for_model(mc, weights=weights, dtype=str(dtype))
        self.pool = BlockPool(n, config.enable_prefix_caching, block_hasher=hasher)
        swap_area = host = None
        if config.preemption_mode is PreemptionMode.SWAP:
            n_swap = config.num_swap_blocks or num_blocks_for_budget(
                config.swap_space_bytes, mc.num_hidden_layers, block_shape, dtype)
            if n_swap <= 0:
                raise ValueError(f"preemption_mode='swap' needs host swap space: swap_space_bytes="
                                 f"{config.swap_space_bytes} holds no KV block; raise it or set num_swap_blocks")
            host = BlockPool(n_swap, enable_caching=False)
            swap_area = allocate_kv_cache(n_swap, mc.num_hidden_layers, block_shape, dtype, "cpu",
                                          pin_memory=device.type == "cuda")
        self.kv = KVCacheManager(self.pool, config.block_size, host, config.enable_partial_block_reuse)
        self.scheduler = Scheduler(config, self.kv, self.max_model_len)
        self.runner = ModelRunner(model, allocate_kv_cache(n, mc.num_hidden_layers, block_shape, dtype, device),
                                  config.block_size, backend, self.kv.tables, swap_area)
        if config.cuda_graphs:
            self.pad_decode(CudaGraphCapture(), min(config.cuda_graph_max_batch, config.max_num_seqs))
        self.eos_ids = set(mc.eos_token_id)
        if tokenizer is not None:
            self.eos_ids |= set(tokenizer.eos_token_ids)
        self.requests: dict[str, Sequence] = {}
        self.scoring = ScoringManager(self)
        self.spec: SpeculationHooks | None = None
        if config.speculative:
            self.spec = EngineSpeculation(self, SpecConfig(max_draft=config.spec_max_draft))
        self._ids = itertools.count()
        logger.info("engine: %d KV blocks of %d tokens on %s (%s, %s attention)", n, config.block_size, device, dtype, backend)

    # ---- requests -------------------------------------------------------------------------
    def pad_decode(self, make_step: Callable[[StepFn], StepFn], max_batch: int) -> int:
        """Routes decode steps of up to ``max_batch`` sequences through padded buckets built by
        ``make_step`` (``CudaGraphCapture`` for ``cuda_graphs``; tests pass ``eager_step``).
        Returns the scratch block, which is never released: padded rows write their K/V there."""
        scratch = self.pool.allocate(1)[0]
        self.runner.enable_padded_decode(scratch, max_batch, -(-self.max_model_len // self.config.block_size),
                                         make_step)
        return scratch

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0) -> str:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError("empty prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room under max_model_len={self.max_model_len}")
        n = next(self._ids)
        rid = request_id if request_id is not None else str(n)
        if rid in self.requests:
            raise ValueError(f"duplicate request id {rid!r}")
        seed = params.seed if params.seed is not None else (self.config.seed * 1_000_003 + n)
        seq = Sequence(rid, ids, params, priority=priority, seed=seed)
        self.requests[rid] = seq
        self.scheduler.add(seq)
        return rid

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Cancel: the request's KV blocks return to the pool at once."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.abort(seq)
        seq.finish_reason = FinishReason.ABORT
        return self._output(seq, [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns outputs of requests that got a token or finished."""
        plan = self._schedule()
        if plan is None:
            return []
        forward = self._forward(plan)
        self._read_logprobs(plan, forward)
        tokens = self._sample(plan, forward)
        return self._postprocess(plan, tokens)

    def _schedule(self) -> StepPlan | None:
        """Drafts, the scheduler's decision and its KV swaps; ``None`` when nothing runs."""
        if self.spec is not None:
            self.spec.propose_drafts()
        sched = self.scheduler.schedule()
        self.runner.swap(sched)  # before anything reuses the blocks a swap-out freed
        if self.spec is not None:
            self.spec.fit_to_schedule(sched)
        if not sched:
            if not self.scheduler.running and len(self.scheduler.waiting):
                raise RuntimeError("KV pool too small for the next waiting request")
            return None
        drafts = self.spec.drafts if self.spec is not None else {}
        sampling = [i for i, s in enumerate(sched.scheduled)
                    if s.samples and s.seq.kind is RequestKind.GENERATE and s.seq not in drafts]
        return StepPlan(sched, sampling, bool(drafts))

    def _forward(self, plan: StepPlan) -> ForwardPass:
        """Prepares the step's inputs and runs the model: the scheduled tokens' K/V are then cached."""
        hidden, inputs = self.runner.execute(plan.sched)
        for s in plan.sched.scheduled:
            s.seq.num_computed_tokens = s.start + s.num_tokens
        return ForwardPass(hidden, inputs)

    def _read_logprobs(self, plan: StepPlan, forward: ForwardPass) -> None:
        """Log-probs read straight off the hidden states: scored positions and prompt log-probs."""
        if self.scoring.active:
            self.scoring.collect(plan.sched, forward.hidden, forward.inputs)
        for i, s in enumerate(plan.sched.scheduled):
            if s.seq.params.prompt_logprobs is not None:
                self._prompt_logprobs(s, forward.hidden, forward.inputs.row_start[i])

    def _sample(self, plan: StepPlan, forward: ForwardPass) -> StepTokens:
        """Verifies the drafts and samples the sampler's rows; drafts and sampling rows share one
        LM-head projection."""
        rows = forward.inputs.last_rows[plan.sample_indices] if plan.sample_indices else None
        verification = Verification()
        if plan.drafted and self.spec is not None:
            verification = self.spec.verify(plan.sched, forward, rows)
        if rows is None:
            return StepTokens(verification.tokens)
        logits = verification.extra_logits
        if logits is None:
            logits = self.runner.logits(forward.hidden, rows)
        seqs = [plan.sched.scheduled[i].seq for i in plan.sample_indices]
        return StepTokens(verification.tokens, draw_tokens(logits, seqs))

    def _postprocess(self, plan: StepPlan, tokens: StepTokens) -> list[RequestOutput]:
        """Appends the new tokens and checks stop conditions, then tells scoring and speculation
        the step is done and retires finished requests."""
        outputs = [self._append_verified(seq, new) for seq, new in tokens.verified.items()]
        outputs += [self._append_sampled(t) for t in tokens.sampled]
        sched = plan.sched
        if self.scoring.active:
            self.scoring.after_step(sched)
        if self.spec is not None:
            self.spec.accept(sched, tokens.verified)
        self._retire(sched)
        return outputs

    def _retire(self, sched: SchedulerOutput) -> None:
        """Frees finished generation requests' blocks; registers the others' newly full blocks."""
        for s in sched.scheduled:
            if s.seq.kind is not RequestKind.GENERATE:
                continue  # scoring sequences are retired by the scoring manager
            if s.seq.is_finished or s.seq.finish_reason is not None:
                self.scheduler.finish(s.seq)
                self.requests.pop(s.seq.request_id, None)
            else:
                self.kv.cache_full_blocks(s.seq)

    def _append_verified(self, seq: Sequence, new: list[int]) -> RequestOutput:
        appended = []
        for tok in new:  # accepted drafts then the target's token, up to the first stop
            seq.output_token_ids.append(tok)
            appended.append(tok)
            self._check_stop(seq, tok)
            if seq.finish_reason is not None:
                break
        return self._output(seq, appended)

    def _append_sampled(self, t: SampledToken) -> RequestOutput:
        seq = t.seq
        seq.output_token_ids.append(t.token_id)
        if t.logprobs is not None:
            seq.logprobs.append(t.logprobs)
        self._check_stop(seq, t.token_id)
        return self._output(seq, [t.token_id])

    def _prompt_logprobs(self, s: ScheduledSeq, hidden: torch.Tensor, row0: int) -> None:
        seq = s.seq
        plen = len(seq.prompt_token_ids)
        if s.start >= plen - 1 and seq.prompt_logprobs:
            return
        if s.start == 0:
            seq.prompt_logprobs = [None]
        hi = min(s.start + s.num_tokens, plen - 1)  # positions predicting prompt tokens
        if hi <= s.start:
            return
        rows = torch.arange(row0, row0 + hi - s.start, device=hidden.device)
        lp = torch.log_softmax(self.runner.logits(hidden, rows), dim=-1)
        targets = torch.tensor(seq.prompt_token_ids[s.start + 1:hi + 1], device=hidden.device)
        chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
        k = seq.params.prompt_logprobs
        top_lp, top_ids = lp.topk(k, dim=-1) if k else (None, None)
        for i, t in enumerate(targets.tolist()):
            entry = {t: chosen[i]}
            if k:
                for tid, v in zip(top_ids[i].tolist(), top_lp[i].tolist()):
                    entry.setdefault(tid, v)
            seq.prompt_logprobs.append(entry)

    def _check_stop(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        if not p.ignore_eos and tok in self.eos_ids:
            seq.finish_reason = FinishReason.STOP
        elif tok in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, tok
        elif p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_token_ids, p.skip_special_tokens)
            hits = [(text.find(st), st) for st in p.stop if st in text]
            if hits:
                at, st = min(hits)
                seq.text = text[:at]
                seq.finish_reason, seq.stop_reason = FinishReason.STOP, st
                return
        if seq.finish_reason is None and (len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = FinishReason.LENGTH

    def _output(self, seq: Sequence, new: list[int]) -> RequestOutput:
        done = seq.finish_reason is not None
        if done and self.tokenizer is not None and seq.stop_reason not in seq.params.stop:
            seq.text = self.tokenizer.decode(seq.output_token_ids, seq.params.skip_special_tokens)
        return RequestOutput(seq.request_id, seq.prompt_token_ids, list(seq.output_token_ids), seq.text, done,
                             seq.finish_reason, seq.stop_reason,
                             seq.logprobs if seq.params.logprobs is not None else None,
                             seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None,
                             seq.num_cached_tokens, new)

    def decode_text(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens) if self.tokenizer else ""


def draw_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
    """One sampled token per sequence (row ``j`` of ``logits`` is ``seqs[j]``'s), in one batched
    call, with the log-probs each request asked for: the token's, then its top candidates'."""
    need_hist = any(q.params.repetition_penalty != 1.0 for q in seqs)
    res = sample(logits, [q.params for q in seqs], [q.seed for q in seqs],
                 [len(q.output_token_ids) for q in seqs],
                 [q.all_token_ids for q in seqs] if need_hist else None)
    ids = res.token_ids.tolist()
    lps = res.logprobs.tolist() if res.logprobs is not None else None
    top_ids = res.top_ids.tolist() if res.top_ids is not None else None
    top_lp = res.top_logprobs.tolist() if res.top_logprobs is not None else None
    out = []
    for j, seq in enumerate(seqs):
        tok, n = ids[j], seq.params.logprobs
        entry = None
        if n is not None and lps is not None:
            entry = {tok: lps[j]}
            if n and top_ids is not None and top_lp is not None:  # logprobs=0: the sampled token only
                for t, lp in zip(top_ids[j][:n], top_lp[j][:n]):
                    entry.setdefault(t, lp)
        out.append(SampledToken(seq, tok, entry))
    return out

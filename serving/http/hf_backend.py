"""A backend running a model folder with ``transformers``, one request at a time.

It has no paged KV, no batching and no prefix cache: it is the reference the engine backend is
checked against (same HTTP answers, same scores) and a fallback for a model the engine cannot
load. Ranking runs one full forward per candidate, the naive method ``/v1/rank`` improves on.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import AsyncIterator

import torch

from llm_engine.reference import Sampling, process_logits
from llm_engine.scoring import ScoreResult, ScoringItem, ScoringOptions, plan, score_items
from serving.http.backend import BackendStats, GenerateParams, TokenEvent, TokenizerDelegate
from serving.http.textstream import TextStream
from serving.http.tokenizer import ModelTokenizer

log = logging.getLogger(__name__)


def _sampling(p: GenerateParams) -> Sampling:
    return Sampling(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                    repetition_penalty=p.repetition_penalty, seed=p.seed)


class TransformersBackend(TokenizerDelegate):
    """:class:`~serving.http.backend.Backend` over ``transformers`` (reference, no batching)."""

    def __init__(self, model_dir: str | Path, served_model_name: str | None = None,
                 max_model_len: int | None = None) -> None:
        from transformers import AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.tok = ModelTokenizer(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.model_id = served_model_name or self.model_dir.name
        self.max_model_len = max_model_len or int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.vocab_size = int(self.model.config.vocab_size)
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        self._aborted: set[str] = set()
        self._waiting = 0
        self._running = 0


    def _lock(self) -> asyncio.Lock:
        # One model, one request at a time; a lock per event loop (each server runs its own).
        return self._locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())

    # generation ----------------------------------------------------------------------------
    def _forward(self, ids: list[int], past):  # noqa: ANN001, ANN202
        with torch.no_grad():
            out = self.model(torch.tensor([ids]), past_key_values=past, use_cache=True)
        return out.logits[0], out.past_key_values

    async def generate(self, request_id: str, prompt_ids: list[int], params: GenerateParams) -> AsyncIterator[TokenEvent]:
        lock = self._lock()
        self._waiting += 1
        try:
            await lock.acquire()
        finally:
            self._waiting -= 1
        self._running += 1
        try:
            gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
            text = TextStream(self.decode, params.stop)
            eos = set() if params.ignore_eos else set(self.tok.eos_token_ids)
            stop_ids = set(params.stop_token_ids) | eos
            logits, past = await asyncio.to_thread(self._forward, prompt_ids, None)
            prompt_lp = None
            if params.prompt_logprobs is not None:
                lsm = torch.log_softmax(logits[:-1].float(), -1)
                prompt_lp = [None] + lsm.gather(1, torch.tensor(prompt_ids[1:])[:, None])[:, 0].tolist()
            row, out_ids, first = logits[-1], [], True
            for step in range(params.max_tokens):
                if request_id in self._aborted:
                    return
                x = process_logits(row, _sampling(params), prompt_ids + out_ids)
                if params.temperature == 0:
                    tok = int(x.argmax())
                else:
                    tok = int(torch.multinomial(torch.softmax(x, -1), 1, generator=gen))
                out_ids.append(tok)
                lp = top = None
                if params.logprobs is not None:
                    lsm = torch.log_softmax(row.float(), -1)
                    lp = [float(lsm[tok])]
                    if params.logprobs > 0:
                        v, i = torch.topk(lsm, params.logprobs)
                        top = [dict(zip(i.tolist(), v.tolist()))]
                    else:
                        top = [{}]
                finish = None
                delta = "" if tok in stop_ids else text.push([tok])
                if tok in stop_ids or text.stopped:
                    finish = "stop"
                elif step + 1 == params.max_tokens or len(prompt_ids) + len(out_ids) >= self.max_model_len:
                    finish = "length"
                if finish == "length":
                    delta += text.flush()
                yield TokenEvent([tok], delta, lp, top, finish, len(prompt_ids), prompt_lp if first else None)
                first = False
                if finish:
                    return
                logits, past = await asyncio.to_thread(self._forward, [tok], past)
                row = logits[-1]
        finally:
            self._running -= 1
            self._aborted.discard(request_id)
            lock.release()

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    # ranking -------------------------------------------------------------------------------
    def _hidden(self, items: list[ScoringItem]) -> torch.Tensor:
        rows = []
        with torch.no_grad():
            for it in items:
                h = self.model.model(torch.tensor([it.token_ids])).last_hidden_state[0]
                rows.append(h[it.target_positions])
        return torch.cat(rows)

    def score(self, context: str, candidates: list[str], options: ScoringOptions) -> ScoreResult:
        items = plan(options, context, candidates, self.encode, self.bos_token_id)
        head = self.model.get_output_embeddings()
        return score_items(items, self._hidden, head.weight.detach(), options, bias=head.bias)

    async def rank(self, request_id: str, context: str, candidates: list[str], options: ScoringOptions) -> ScoreResult:
        async with self._lock():
            return await asyncio.to_thread(self.score, context, candidates, options)

    def stats(self) -> BackendStats:
        return BackendStats(waiting=self._waiting, running=self._running)

    def close(self) -> None:
        pass

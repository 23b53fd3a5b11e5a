"""The HTTP backend over :class:`llm_engine.LLMEngine`: one driver thread steps the engine.

The engine is single-threaded by design, so every call into it (add, abort, step, score) runs on
the driver thread; the asyncio side sends commands through a queue and receives each request's
outputs on its own ``asyncio.Queue`` (``call_soon_threadsafe``). Generation and ranking share the
one engine: one scheduler, one KV pool, one copy of the weights.

Work enters the scheduler in its :class:`batching.Priority` class (rerank before ``/v1/rank``
before generation). In ``headwater serve --llm`` the DLRM shares the process: before each step
the driver waits its turn at ``arbiter`` (a :class:`batching.Arbiter`) in the class of the most
urgent request the step runs, so DLRM scoring in flight holds a rerank step less long than a
``/v1/rank`` or generation step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from batching import Arbiter, Priority
from llm_engine import EngineConfig, LLMEngine, SamplingParams
from llm_engine.outputs import RequestOutput
from llm_engine.scoring import ScoreResult, ScoringItem, ScoringOptions
from serving.metrics import GATE_HELD
from serving.http.backend import BackendStats, GenerateParams, TokenEvent, TokenizerDelegate
from serving.http.textstream import TextStream
from serving.http.tokenizer import ModelTokenizer

log = logging.getLogger(__name__)


def to_sampling_params(p: GenerateParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_k=max(p.top_k, 0), top_p=p.top_p, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty, seed=p.seed, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos, logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs,
    )


@dataclass
class _Listener:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineBackend(TokenizerDelegate):
    """:class:`~serving.http.backend.Backend` driving an :class:`LLMEngine` from one thread."""

    def __init__(self, engine: LLMEngine, tokenizer: ModelTokenizer, model_id: str,
                 arbiter: Arbiter | None = None) -> None:
        self.engine, self.tok, self.model_id = engine, tokenizer, model_id
        self.arbiter = arbiter
        self.max_model_len = engine.max_model_len
        self.vocab_size = int(engine.model.config.vocab_size)
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._listeners: dict[str, _Listener] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drive, name="llm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, served_model_name: str | None = None,
                       config: EngineConfig | None = None) -> EngineBackend:
        engine = LLMEngine(model_dir, config or EngineConfig())
        return cls(engine, ModelTokenizer(model_dir), served_model_name or Path(model_dir).name)


    # driver thread -------------------------------------------------------------------------
    def _drive(self) -> None:
        while not self._stop.is_set():
            try:
                block = not self.engine.has_unfinished()
                cmd = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                try:
                    cmd()
                except Exception:  # noqa: BLE001 - a bad command must not kill the engine
                    log.exception("engine command failed")
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self.engine.has_unfinished():
                cls = self.engine.scheduler.next_priority() if self.arbiter is not None else None
                if cls is not None and (waited := self.arbiter.wait_turn(cls)):
                    GATE_HELD.inc(waited)
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # noqa: BLE001 - fail the requests, keep serving
                    log.exception("engine step failed")
                    self._fail_all(exc)
                    continue
                for out in outputs:
                    self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: Any) -> None:
        listener = self._listeners.get(request_id)
        if listener is not None:
            listener.loop.call_soon_threadsafe(listener.queue.put_nowait, item)
            if isinstance(item, RequestOutput) and item.finished or isinstance(item, Exception):
                self._listeners.pop(request_id, None)

    def _fail_all(self, exc: Exception) -> None:
        for rid in list(self._listeners):
            self.engine.abort_request(rid)
            self._deliver(rid, RuntimeError(f"engine step failed: {exc}"))

    def _call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Runs ``fn`` on the driver thread; the future resolves with its result."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

        self._commands.put(run)
        return fut

    # generation ----------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int], params: GenerateParams) -> AsyncIterator[TokenEvent]:
        sp = to_sampling_params(params)
        q: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def add() -> None:
            self._listeners[request_id] = _Listener(loop, q)
            try:
                self.engine.add_request(list(prompt_ids), sp, request_id=request_id, priority=Priority.GENERATE)
            except Exception:
                self._listeners.pop(request_id, None)
                raise

        await self._call(add)
        text = TextStream(self.decode, params.stop)
        seen, first = 0, True
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    raise item
                out: RequestOutput = item
                new = out.token_ids[seen:]
                seen = len(out.token_ids)
                finished = out.finished
                event = self._event(out, new, params, text, first)
                first = False
                if event.token_ids or event.finish_reason:
                    yield event
                if out.finished:
                    return
        finally:
            if not finished:
                await self.abort(request_id)

    def _event(self, out: RequestOutput, new: list[int], params: GenerateParams, text: TextStream,
               first: bool) -> TokenEvent:
        eos = set() if params.ignore_eos else set(self.engine.eos_ids)
        shown = [t for t in new if t not in eos and t not in params.stop_token_ids]
        delta = text.push(shown) if shown else ""
        if out.finished and out.finish_reason == "length":
            delta += text.flush()
        lps = tops = None
        if params.logprobs is not None and out.logprobs is not None:
            entries = out.logprobs[len(out.token_ids) - len(new):]
            lps, tops = [], []
            for tok, entry in zip(new, entries):
                lps.append(entry.get(tok, float("nan")))
                top = dict(entry)
                if len(top) > params.logprobs:
                    top.pop(tok, None)
                tops.append(dict(list(top.items())[: params.logprobs]))
        prompt_lp = None
        if first and params.prompt_logprobs is not None and out.prompt_logprobs is not None:
            prompt_lp = [None if e is None else next(iter(e.values())) for e in out.prompt_logprobs]
        finish = out.finish_reason if out.finished else None
        if finish == "abort":
            finish = None
        return TokenEvent(new, delta, lps, tops, finish, len(out.prompt_token_ids), prompt_lp)

    async def abort(self, request_id: str) -> None:
        def drop() -> None:
            self._listeners.pop(request_id, None)
            self.engine.abort_request(request_id)

        await self._call(drop)

    # ranking -------------------------------------------------------------------------------
    async def rank(self, request_id: str, context: str, candidates: list[str], options: ScoringOptions) -> ScoreResult:
        from llm_engine.ranking import plan_request

        items = plan_request(options, context, candidates, self.encode, self.bos_token_id)
        return await self.score_items(request_id, items, options, Priority.RANK)

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV pool holds in all (what one call may occupy at most)."""
        return self.engine.pool.num_blocks * self.engine.config.block_size

    async def score_items(self, request_id: str, items: list[ScoringItem], options: ScoringOptions,
                          priority: int = Priority.RANK) -> ScoreResult:
        """Scores tokenised items (one shared context) on the engine; cancelling aborts the call
        and frees its blocks."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def submit() -> None:
            def done(result: ScoreResult | Exception) -> None:
                if isinstance(result, Exception):
                    loop.call_soon_threadsafe(_set_exception, fut, result)
                else:
                    loop.call_soon_threadsafe(_set_result, fut, result)

            self.engine.scoring.submit(request_id, items, options, done, priority=int(priority))

        await self._call(submit)
        try:
            return await fut
        finally:
            if not fut.done():
                self._commands.put(lambda: self.engine.scoring.abort(request_id))

    def stats(self) -> BackendStats:
        e = self.engine
        pool = e.pool
        spec = getattr(e, "spec", None)
        return BackendStats(
            waiting=len(e.scheduler.waiting), running=len(e.scheduler.running),
            kv_usage=pool.num_used / pool.num_blocks,
            prefix_cache_hit_rate=pool.hits / pool.queries if pool.queries else 0.0,
            prefix_cache_mismatches=pool.mismatches,
            spec_acceptance_rate=spec.acceptance_rate if spec is not None else 0.0,
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)

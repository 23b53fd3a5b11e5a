"""OpenAI-compatible ``POST /v1/completions`` and ``POST /v1/chat/completions``."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from serving.http.backend import GenerateParams
from serving.http.chat_template import ChatTemplateError, render_chat
from serving.http.errors import APIError
from serving.http.schemas import (ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                  CompletionResponse, SamplingFields)
from serving.http.state import ServerState
from serving.http.streams import SSE_DONE, ChoiceState, Job, collect, merged, sse


def _streamable(body: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict]:
    """200 is ``body`` as JSON, or ``chunk`` events (then ``[DONE]``) with ``"stream": true``."""
    done = {"type": "string", "enum": ["[DONE]"]}
    return {200: {"description": "the answer (JSON), or server-sent chunks when streaming",
                  "content": {"application/json": {"schema": body.model_json_schema(ref_template="#/components/schemas/{model}")},
                              "text/event-stream": {"schema": {"anyOf": [chunk.model_json_schema(), done]}}}}}


def _params(req: SamplingFields, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> GenerateParams:
    return GenerateParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop=list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def _budget(state: ServerState, prompt_len: int, requested: int | None) -> int:
    limit = state.backend.max_model_len
    if prompt_len >= limit:
        raise APIError(400, f"prompt is {prompt_len} tokens; this model's maximum context length is {limit} tokens", "prompt")
    if requested is None:
        return limit - prompt_len
    if prompt_len + requested > limit:
        raise APIError(
            400,
            f"this model's maximum context length is {limit} tokens, but {prompt_len + requested} were requested "
            f"({prompt_len} in the prompt, {requested} to generate); reduce the prompt or max_tokens",
            "max_tokens",
        )
    return requested


def _jobs(req: SamplingFields, prompts: list[list[int]], max_tokens: list[int], rid: str,
          logprobs: int | None, prompt_logprobs: int | None) -> list[Job]:
    jobs = []
    for p, ids in enumerate(prompts):
        for i in range(req.n):
            params = _params(req, max_tokens[p], logprobs, prompt_logprobs)
            if req.seed is not None:
                params.seed = req.seed + i  # n choices from one seed must still differ
            jobs.append(Job(p * req.n + i, f"{rid}-{p}-{i}", ids, params))
    return jobs


def _usage(states: dict[int, ChoiceState], jobs: list[Job], n: int) -> dict:
    """OpenAI counts each prompt once however many choices it has."""
    prompt = sum(len(j.prompt_ids) for j in jobs if j.index % n == 0)
    completion = sum(len(s.token_ids) for s in states.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class AdmittedStream(StreamingResponse):
    """A streamed answer that gives its admission slot back however the response ends: an
    async generator that never started (client gone before the first byte) runs no ``finally``."""

    def __init__(self, content, release, **kwargs) -> None:  # noqa: ANN001
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _stream(state: ServerState, jobs: list[Job], n: int, chunk, final_chunk, include_usage: bool) -> StreamingResponse:  # noqa: ANN001
    async def body() -> AsyncIterator[str]:
        states = {j.index: ChoiceState() for j in jobs}
        async for index, ev in merged(state.backend, jobs):
            states[index].add(ev)
            for obj in chunk(index, ev, states[index]):
                yield sse(obj)
        if include_usage:
            yield sse(final_chunk(_usage(states, jobs, n)))
        yield SSE_DONE

    return AdmittedStream(body(), state.admission.release, media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache"})


async def _answer(state: ServerState, request: Request, req: SamplingFields, jobs: list[Job], chunk,  # noqa: ANN001
                  final_chunk) -> StreamingResponse | dict[int, ChoiceState]:
    """The tail both routes share: take an admission slot, then either stream (the response
    gives the slot back) or collect every choice (given back here, however it ends)."""
    state.admission.acquire()
    if req.stream:
        return _stream(state, jobs, req.n, chunk, final_chunk, req.include_usage)
    try:
        return await state.until_disconnect(request, collect(state.backend, jobs))
    finally:
        state.admission.release()


def build_router(state: ServerState) -> APIRouter:
    router = APIRouter()
    backend = state.backend

    def completion_logprobs(s: ChoiceState, echo_ids: list[int] | None, text_start: int) -> dict:
        ids = list(echo_ids or []) + s.token_ids
        lps: list[float | None] = (list(s.prompt_logprobs or [None] * len(echo_ids)) if echo_ids else []) + s.logprobs
        tops: list[dict | None] = ([None] * len(echo_ids) if echo_ids else []) + [
            {backend.token_text(t): lp for t, lp in d.items()} for d in s.top_logprobs
        ]
        tokens = [backend.token_text(t) for t in ids]
        offsets, pos = [], text_start
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops or None, "text_offset": offsets}

    @router.post("/v1/completions", responses=_streamable(CompletionResponse, CompletionResponse))
    async def completions(req: CompletionRequest, request: Request):  # noqa: ANN202
        state.check_model(req.model)
        if req.best_of not in (None, req.n):
            raise APIError(400, "best_of is not supported (use n)", "best_of")
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        raw = req.prompt
        if isinstance(raw, str):
            prompts = [backend.encode(raw, add_special_tokens=True)]
        elif raw and isinstance(raw[0], int):
            prompts = [list(raw)]
        elif raw and isinstance(raw[0], str):
            prompts = [backend.encode(p, add_special_tokens=True) for p in raw]
        else:
            prompts = [list(p) for p in raw]
        vocab = backend.vocab_size
        bad = next(((p, t) for p, ids in enumerate(prompts) for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt[{bad[0]}] holds token id {bad[1]}; ids must lie in [0, {vocab})", "prompt")
        if len(prompts) * req.n > state.config.max_choices:
            raise APIError(400, f"at most {state.config.max_choices} prompts x n per request", "n")
        budgets = [_budget(state, len(p), req.max_tokens) for p in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        created, model = int(time.time()), backend.model_id
        lp = req.logprobs
        jobs = _jobs(req, prompts, budgets, rid, lp, (lp or 0) if (req.echo and lp is not None) else None)
        echo_text = {p: backend.decode(ids) for p, ids in enumerate(prompts)} if req.echo else {}

        def chunk(index: int, ev, s: ChoiceState):  # noqa: ANN001, ANN202
            p = index // req.n
            text = ev.text
            echo_ids = None
            if req.echo and len(s.token_ids) == len(ev.token_ids):  # first event of this choice
                text = echo_text[p] + text
                echo_ids = prompts[p]
            choice = {"index": index, "text": text, "finish_reason": ev.finish_reason, "logprobs": None}
            if lp is not None:
                one = ChoiceState(token_ids=ev.token_ids, logprobs=ev.logprobs or [], top_logprobs=ev.top_logprobs or [],
                                  prompt_logprobs=s.prompt_logprobs)
                choice["logprobs"] = completion_logprobs(one, echo_ids, 0)
            yield {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}

        def final_chunk(usage: dict) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [], "usage": usage}

        states = await _answer(state, request, req, jobs, chunk, final_chunk)
        if isinstance(states, StreamingResponse):
            return states
        choices = []
        for j in jobs:
            s = states[j.index]
            p = j.index // req.n
            prefix = echo_text.get(p, "")
            choices.append({
                "index": j.index,
                "text": prefix + s.text,
                "logprobs": completion_logprobs(s, prompts[p] if req.echo else None, 0) if lp is not None else None,
                "finish_reason": s.finish_reason,
            })
        usage = _usage(states, jobs, req.n)
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices, "usage": usage}

    def chat_logprobs(ids: list[int], lps: list[float], tops: list[dict[int, float]]) -> dict:
        content = []
        for i, t in enumerate(ids):
            tok = backend.token_text(t)
            entry = {"token": tok, "logprob": lps[i] if i < len(lps) else None, "bytes": list(tok.encode())}
            entry["top_logprobs"] = [
                {"token": backend.token_text(a), "logprob": v, "bytes": list(backend.token_text(a).encode())}
                for a, v in (tops[i].items() if i < len(tops) else ())
            ]
            content.append(entry)
        return {"content": content}

    @router.post("/v1/chat/completions", responses=_streamable(ChatCompletionResponse, ChatCompletionChunk))
    async def chat(req: ChatCompletionRequest, request: Request):  # noqa: ANN202
        state.check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = render_chat(messages, backend.chat_template, req.add_generation_prompt, state.special_tokens)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), "messages") from None
        prompt = backend.encode(text, add_special_tokens=False)
        if req.n > state.config.max_choices:
            raise APIError(400, f"n must be at most {state.config.max_choices}", "n")
        budget = _budget(state, len(prompt), req.max_completion_tokens or req.max_tokens)
        top = (req.top_logprobs or 0) if req.logprobs else None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created, model = int(time.time()), backend.model_id
        jobs = _jobs(req, [prompt], [budget], rid, top, None)

        def chunk(index: int, ev, s: ChoiceState):  # noqa: ANN001, ANN202
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
            if len(s.token_ids) == len(ev.token_ids):  # first event: announce the role
                yield {**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
            choice = {"index": index, "delta": {"content": ev.text} if ev.text else {}, "finish_reason": ev.finish_reason,
                      "logprobs": chat_logprobs(ev.token_ids, ev.logprobs or [], ev.top_logprobs or []) if top is not None else None}
            yield {**base, "choices": [choice]}

        def final_chunk(usage: dict) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage}

        states = await _answer(state, request, req, jobs, chunk, final_chunk)
        if isinstance(states, StreamingResponse):
            return states
        choices = [{
            "index": j.index,
            "message": {"role": "assistant", "content": states[j.index].text},
            "logprobs": chat_logprobs(states[j.index].token_ids, states[j.index].logprobs, states[j.index].top_logprobs)
            if top is not None else None,
            "finish_reason": states[j.index].finish_reason,
        } for j in jobs]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": _usage(states, jobs, req.n)}

    return router

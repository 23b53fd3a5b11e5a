"""The HTTP server over real loopback sockets: a uvicorn server on a free port, an httpx client."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from serving.http import HttpServerConfig, create_app
from serving.http.server import RunningServer


@pytest.fixture(scope="module", params=["engine", "transformers"])
def backend(request, tiny_model_dir):
    """The same HTTP behaviour over the engine and over the transformers reference."""
    if request.param == "engine":
        from llm_engine import EngineConfig
        from serving.http.engine_backend import EngineBackend

        b = EngineBackend.from_model_dir(tiny_model_dir, "tiny", EngineConfig(max_model_len=256, num_kv_blocks=256))
        yield b
        b.close()
    else:
        from serving.http.hf_backend import TransformersBackend

        yield TransformersBackend(tiny_model_dir, served_model_name="tiny", max_model_len=256)


@pytest.fixture(scope="module")
def server(backend):
    app = create_app(backend, HttpServerConfig(max_candidates=50), special_tokens=backend.special_tokens)
    with RunningServer(app) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _sse(lines) -> list:
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_server_binds_loopback_and_reports_health_models_and_openapi(server, client):
    assert server.host == "127.0.0.1"
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/rank", "/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(paths)


def test_greedy_completion_counts_usage_and_stops_at_max_tokens(client, backend):
    body = client.post("/v1/completions", json={"prompt": "the quick brown", "max_tokens": 6, "temperature": 0,
                                                 "ignore_eos": True}).json()
    choice = body["choices"][0]
    assert body["object"] == "text_completion"
    assert choice["finish_reason"] == "length"
    prompt_len = len(backend.encode("the quick brown", add_special_tokens=True))
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 6, "total_tokens": prompt_len + 6}


def test_streamed_completion_equals_the_unstreamed_one(client):
    req = {"prompt": "science fiction films", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**req, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 8
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == whole
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_n_choices_with_a_seed_are_reproducible(client):
    req = {"prompt": "hello", "max_tokens": 5, "temperature": 1.0, "n": 3, "seed": 11, "ignore_eos": True}
    a = client.post("/v1/completions", json=req).json()
    b = client.post("/v1/completions", json=req).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert a["usage"]["completion_tokens"] == 15


def test_logprobs_and_echo(client, backend):
    body = client.post("/v1/completions", json={"prompt": "the lazy dog", "max_tokens": 3, "temperature": 0,
                                                 "logprobs": 2, "echo": True, "ignore_eos": True}).json()
    choice = body["choices"][0]
    n_prompt = len(backend.encode("the lazy dog", add_special_tokens=True))
    lp = choice["logprobs"]
    assert choice["text"].startswith("the lazy dog")
    assert len(lp["tokens"]) == n_prompt + 3
    assert lp["token_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert all(len(t) == 2 for t in lp["top_logprobs"][n_prompt:])
    # Greedy: the sampled token is the most likely one.
    for tok, lpv, top in zip(lp["tokens"][n_prompt:], lp["token_logprobs"][n_prompt:], lp["top_logprobs"][n_prompt:]):
        assert lpv == pytest.approx(max(top.values()), abs=1e-5)


def test_stop_string_truncates_the_text(client):
    req = {"prompt": "romantic films", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    text = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    stop = text[3:6]
    assert stop
    choice = client.post("/v1/completions", json={**req, "stop": [stop]}).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == text[: text.find(stop)]


def test_chat_completion_uses_the_model_chat_template(client, backend):
    msgs = [{"role": "user", "content": "hello world"}]
    body = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 4, "temperature": 0,
                                                      "logprobs": True, "top_logprobs": 1}).json()
    templated = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    assert body["object"] == "chat.completion"
    assert body["usage"]["prompt_tokens"] == len(backend.encode(templated))
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert len(body["choices"][0]["logprobs"]["content"]) == body["usage"]["completion_tokens"]
    with client.stream("POST", "/v1/chat/completions", json={"messages": msgs, "max_tokens": 4, "temperature": 0,
                                                             "stream": True}) as r:
        events = _sse(r.iter_lines())
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == body["choices"][0]["message"]["content"]


def test_rank_returns_scores_aligned_with_candidates_and_best_first_order(client, backend):
    cands = [" star wars", " the notebook", " alien", " titanic"]
    body = client.post("/v1/rank", json={"context": "science fiction films:", "candidates": cands}).json()
    assert body["object"] == "rank" and len(body["scores"]) == 4
    assert sorted(body["ranking"]) == [0, 1, 2, 3]
    assert [body["scores"][i] for i in body["ranking"]] == sorted(body["scores"], reverse=True)
    assert body["usage"]["prompt_tokens"] > 0
    yes = client.post("/v1/rank", json={"context": "a user who likes robots", "candidates": cands,
                                         "method": "yes_prob", "yes_token": " yes", "no_token": " no",
                                         "template": "{context}: is{candidate} good?"})
    assert yes.status_code == 400 and "exactly one token" in yes.json()["error"]["message"]


def test_rank_scores_equal_a_full_forward_per_candidate(client, tiny_model_dir):
    from llm_engine.scoring import ScoringOptions
    from serving.http.hf_backend import TransformersBackend

    cands = [" star wars", " the notebook", " alien", " blade runner", " titanic"]
    ctx = "a user who watched space operas and robots likes more science fiction. next:"
    for opts in ({"normalize": "sum"}, {"method": "yes_prob", "template": "{context}{candidate}", "yes_token": " a",
                                        "no_token": None}):
        body = client.post("/v1/rank", json={"context": ctx, "candidates": cands, **opts}).json()
        want = TransformersBackend(tiny_model_dir).score(ctx, cands, ScoringOptions(**opts))
        assert body["scores"] == pytest.approx(want.scores, abs=1e-4)
        assert body["ranking"] == want.ranking


@pytest.mark.parametrize("body, fragment", [
    ({"context": "x", "candidates": []}, "candidates"),
    ({"context": "x", "candidates": ["a"] * 51}, "at most 50"),
    ({"context": "the " * 400, "candidates": ["a"]}, "maximum context length"),
    ({"context": "x", "candidates": ["a", ""]}, "non-empty"),
    ({"context": "x", "candidates": ["a"], "method": "vibes"}, "method"),
])
def test_bad_rank_requests_get_400_with_a_clear_message(client, body, fragment):
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 400
    assert fragment in r.json()["error"]["message"]


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "top_k": 0}, "top_k"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "max_tokens": 1000}, "maximum context length"),
    ({"prompt": "x", "n": 2, "best_of": 3}, "best_of"),
])
def test_bad_sampling_values_get_400(client, body, fragment):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400
    assert fragment in r.json()["error"]["message"]


def test_bearer_token_guards_the_api_but_not_health(backend):
    app = create_app(backend, HttpServerConfig(api_key="s3cret"))
    with RunningServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_full_admission_queue_answers_429_with_retry_after(backend):
    app = create_app(backend, HttpServerConfig(max_pending_requests=0, retry_after_s=3))
    with RunningServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        for path, body in [("/v1/completions", {"prompt": "x"}), ("/v1/rank", {"context": "x", "candidates": ["a"]}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})]:
            r = c.post(path, json=body)
            assert r.status_code == 429
            assert r.headers["retry-after"] == "3"
            assert "capacity" in r.json()["error"]["message"]


def test_admission_admits_up_to_the_limit_and_frees_slots_when_requests_end(backend):
    from concurrent.futures import ThreadPoolExecutor

    app = create_app(backend, HttpServerConfig(max_pending_requests=2))
    req = {"prompt": "hello", "max_tokens": 200, "n": 8, "temperature": 0, "ignore_eos": True}
    with RunningServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        with ThreadPoolExecutor(6) as pool:
            codes = sorted(pool.map(lambda _: c.post("/v1/completions", json=req).status_code, range(6)))
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) == {200, 429}
        assert app.state.hw.admission.in_flight == 0
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_client_disconnect_cancels_the_engine_request(server, backend):
    req = {"prompt": "hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=req) as r:
            lines = r.iter_lines()
            next(lines)
            assert backend.stats().running == 1
        deadline = time.monotonic() + 10
        while backend.stats().running or backend.stats().kv_usage:
            assert time.monotonic() < deadline, "request kept running (or its KV blocks) after its client left"
            time.sleep(0.05)


def test_metrics_expose_latency_histograms_and_engine_gauges(client):
    client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3, "ignore_eos": True})
    text = client.get("/metrics").text
    for name in ("hw_llm_time_to_first_token_seconds_bucket", "hw_llm_inter_token_latency_seconds_bucket",
                 "hw_llm_queue_depth", "hw_llm_running", "hw_llm_kv_usage", "hw_llm_prefix_cache_hit_rate",
                 "hw_llm_spec_acceptance_rate", "hw_llm_http_requests_total"):
        assert name in text

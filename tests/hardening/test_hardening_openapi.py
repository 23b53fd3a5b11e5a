"""Schemathesis against the real LLM HTTP server's ``/openapi.json`` (uvicorn on a loopback port,
tiny random model): generated requests, valid and not, never get a 5xx, and every response
matches the schema the server publishes (status codes, content types, bodies)."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance
from hypothesis import HealthCheck, given, settings

from serving.http import HttpServerConfig, create_app
from serving.http.server import RunningServer


@pytest.fixture(scope="module")
def llm_server(engine_backend):
    app = create_app(engine_backend, HttpServerConfig(max_candidates=16, max_choices=4))
    with RunningServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def llm_api_schema(llm_server):
    return schemathesis.openapi.from_url(f"{llm_server.url}/openapi.json")


# ``positive_data_acceptance`` is left out: limits that depend on the model (context length in
# tokens, prompts x n) cannot be written in a JSON schema, so a schema-valid request may get a
# documented 400. Every other check runs, including that invalid data is rejected with a 4xx.
# schemathesis' lazy pytest loader does not run under pytest 9; the operations are driven here
# instead (the same generation and checks, one hypothesis run per operation).
OPERATIONS = ["GET /health", "GET /metrics", "GET /v1/models", "POST /v1/chat/completions",
              "POST /v1/completions", "POST /v1/rank"]


def test_the_schema_lists_exactly_the_fuzzed_operations(llm_api_schema):
    labels = sorted(r.ok().label for r in llm_api_schema.get_all_operations())
    assert labels == sorted(OPERATIONS)


@pytest.mark.parametrize("label", OPERATIONS)
def test_llm_server_conforms_to_its_openapi_schema(llm_api_schema, label):
    (op,) = [r.ok() for r in llm_api_schema.get_all_operations() if r.ok().label == label]

    @given(case=op.as_strategy())
    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        case.call_and_validate(timeout=60, excluded_checks=[positive_data_acceptance])

    run()


@pytest.mark.parametrize("route, body", [
    # logprobs=0 asks for the sampled token's logprob only: it crashed the engine step (500 for all).
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logprobs": 0}),
    # a top_p that rounds to 0 in float32 masked every token: NaN probabilities in the sampler.
    ("/v1/chat/completions", {"messages": [{"role": "user"}, {"role": "tool", "content": None}], "top_p": 5e-324,
                              "max_tokens": 4}),
    ("/v1/completions", {"prompt": "hi", "top_p": 1e-46, "max_tokens": 4}),
])
def test_requests_that_once_crashed_the_engine_are_answered(llm_server, route, body):
    r = httpx.post(llm_server.url + route, json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("prompt", [[71105811622571202236226482470912], [-1], [1, 2, 384]])
def test_token_ids_outside_the_vocabulary_are_a_400_naming_the_prompt(llm_server, prompt):
    r = httpx.post(llm_server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "ids must lie in [0, 384)" in r.json()["error"]["message"]

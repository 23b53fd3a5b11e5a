"""The security floor: loopback binds, constant-time bearer tokens, no unsafe deserialisation or
evaluation anywhere in the source, and request fields never used as file paths."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import ipaddress
import os
import sys
import threading
from pathlib import Path

import grpc
import httpx
import pytest

from serving.http import HttpServerConfig, create_app
from serving.http.server import RunningServer
from streams.broker import free_port

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("batching", "hashing", "headwater", "streams", "embedding_store", "paramsync", "training", "serving",
            "llm_engine", "scripts")


# -- binds -------------------------------------------------------------------------------------


def server_configs() -> list[tuple[str, type]]:
    from headwater.cli.config_cmd import CONFIGS

    refs = dict(CONFIGS, dashboard="serving.dashboard:DashboardConfig")
    out = []
    for name, ref in sorted(refs.items()):
        module, cls = ref.split(":")
        out.append((name, getattr(importlib.import_module(module), cls)))
    return out


def test_every_config_with_a_bind_address_defaults_to_loopback():
    bound = []
    for name, cls in server_configs():
        for f in dataclasses.fields(cls):
            if f.name in ("host", "bind", "listen", "bind_host", "metrics_host"):
                assert f.default == "127.0.0.1", f"{name}.{f.name} defaults to {f.default!r}"
                bound.append(name)
    assert {"serve", "llm_serve", "dashboard", "broker"} <= set(bound)


def listening_addresses(port: int) -> set[str]:
    """Local addresses LISTENing on ``port`` per the kernel (/proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))
                ip = ipaddress.ip_address(raw)
                found.add(str(getattr(ip, "ipv4_mapped", None) or ip))  # ::ffff:127.0.0.1 is loopback too
    return found


def test_grpc_http_and_metrics_servers_listen_on_loopback_only_by_default(engine_backend, monkeypatch):
    from headwater.metrics import serve_metrics
    from serving.config import ServeConfig
    from serving.server import RecommendServer, StaticModelSource

    grpc_server = RecommendServer(ServeConfig(port=0), StaticModelSource()).start()
    try:
        assert listening_addresses(grpc_server.port) == {"127.0.0.1"}
    finally:
        grpc_server.stop(0)
    with RunningServer(create_app(engine_backend)) as http_server:  # RunningServer's default host
        assert listening_addresses(http_server.port) == {"127.0.0.1"}
    monkeypatch.delenv("HW_METRICS_HOST", raising=False)
    port = free_port()
    serve_metrics(port)
    assert listening_addresses(port) == {"127.0.0.1"}


# -- bearer tokens -----------------------------------------------------------------------------


def test_both_token_checks_compare_in_constant_time():
    from serving.http import app as http_app
    from serving.server import _AuthInterceptor

    for fn in (http_app.create_app, _AuthInterceptor.intercept_service):
        tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(fn)))
        calls = [ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]
        assert "hmac.compare_digest" in calls, fn
        # ...and no plain equality anywhere near a token or an authorization header.
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                text = ast.unparse(node).lower()
                assert "token" not in text and "auth" not in text and "want" not in text, text


@pytest.fixture(scope="module")
def guarded_http(engine_backend):
    app = create_app(engine_backend, HttpServerConfig(api_key="s3cret-token"))
    with RunningServer(app) as srv:
        yield srv


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Bearer s3cret-toke", "Bearer s3cret-token2",
                                    "s3cret-token", "bearer s3cret-token"])
def test_http_wrong_or_missing_token_is_401_on_every_v1_route(guarded_http, header):
    headers = {"Authorization": header} if header else {}
    with httpx.Client(base_url=guarded_http.url, timeout=30) as c:
        for method, path, body in (("GET", "/v1/models", None),
                                   ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
                                   ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                                   ("POST", "/v1/rank", {"context": "a", "candidates": ["b"]})):
            r = c.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["type"] == "authentication_error"


def test_http_right_token_is_served_and_health_needs_none(guarded_http):
    with httpx.Client(base_url=guarded_http.url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                   headers={"Authorization": "Bearer s3cret-token"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer nope"),), (("authorization", "tok3n"),),
                                      (("authorization", "Bearer tok3n-extra"),)])
def test_grpc_wrong_or_missing_token_is_unauthenticated(metadata):
    from serving.config import ServeConfig
    from serving.pb import pb2, pb2_grpc
    from serving.server import RecommendServer, StaticModelSource
    from serving.testing import random_model

    server = RecommendServer(ServeConfig(port=0, auth_token="tok3n", precision="float32"),
                             StaticModelSource(random_model(hidden=(8,)))).start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb2_grpc.RecommenderStub(ch)
            req = pb2.RecommendRequest(user_id=1, candidate_item_ids=[1, 2, 3])
            with pytest.raises(grpc.RpcError) as err:
                stub.Recommend(req, metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in err.value.details()
            ok = stub.Recommend(req, metadata=(("authorization", "Bearer tok3n"),), timeout=10)
            assert len(ok.items) == 3
    finally:
        server.stop(0)


# -- no unsafe deserialisation or evaluation ---------------------------------------------------

BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}


def unsafe_uses(tree: ast.AST) -> list[str]:
    """What in ``tree`` could run code from data: see the module docstring for the list."""
    found = []
    for node in ast.walk(tree):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            found.append(f"{where}: from {node.module} import")
        elif isinstance(node, ast.Call):
            func, kw = node.func, {k.arg: k.value for k in node.keywords}
            name = ast.unparse(func)
            if isinstance(func, ast.Name) and func.id in ("eval", "exec", "__import__"):
                found.append(f"{where}: {func.id}()")
            elif name == "torch.load" and not (isinstance(kw.get("weights_only"), ast.Constant)
                                               and kw["weights_only"].value is True):
                found.append(f"{where}: torch.load without weights_only=True")
            elif name == "yaml.load" or name == "yaml.unsafe_load" or name == "yaml.full_load":
                found.append(f"{where}: {name} (use yaml.safe_load)")
            elif name in ("np.load", "numpy.load") and isinstance(kw.get("allow_pickle"), ast.Constant) \
                    and kw["allow_pickle"].value is True:
                found.append(f"{where}: {name}(allow_pickle=True)")
    return found


def test_the_scanner_catches_each_banned_construct():
    bad = ("import pickle\nfrom marshal import loads\nimport yaml, torch, numpy as np\n"
           "eval('1')\nexec('x=1')\ntorch.load('f')\ntorch.load('f', weights_only=False)\n"
           "yaml.load(s)\nnp.load('f', allow_pickle=True)\n")
    assert len(unsafe_uses(ast.parse(bad))) == 8
    good = "import yaml, torch\nmodel.eval()\ntorch.load('f', weights_only=True)\nyaml.safe_load(s)\n"
    assert unsafe_uses(ast.parse(good)) == []


def test_no_source_file_deserialises_with_pickle_or_evaluates_input():
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "_gen" not in p.parts]
    files += [ROOT / "hatch_build.py"]
    assert len(files) > 100
    problems = {str(p.relative_to(ROOT)): unsafe_uses(ast.parse(p.read_text(), str(p))) for p in files}
    assert {k: v for k, v in problems.items() if v} == {}


# -- request fields are never paths ------------------------------------------------------------

_opened: list[str] = []
_watch = threading.Event()


def _audit(event: str, args: tuple) -> None:
    if _watch.is_set() and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # hooks cannot be removed; this one records only while _watch is set


@pytest.fixture(scope="module")
def open_http(engine_backend):
    with RunningServer(create_app(engine_backend)) as srv:
        yield srv


def test_the_model_field_is_matched_against_served_names_and_never_opened(open_http, hardening_model_dir):
    paths = [str(hardening_model_dir), str(hardening_model_dir / "config.json"), "/etc/passwd",
             "../../../../etc/passwd", "file:///etc/passwd"]
    with httpx.Client(base_url=open_http.url, timeout=30) as c:
        _opened.clear()
        _watch.set()
        try:
            for path in paths:
                for route, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
                                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                                    ("/v1/rank", {"context": "a", "candidates": ["b"]})):
                    r = c.post(route, json={**body, "model": path})
                    assert r.status_code == 404, (route, path, r.text)
                    err = r.json()["error"]
                    assert err["param"] == "model" and "this server serves ['tiny']" in err["message"]
        finally:
            _watch.clear()
        assert not [p for p in _opened if any(x.strip("./") in p for x in paths if x.strip("./"))], _opened
        # The served name itself is accepted.
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "model": "tiny"}).status_code == 200

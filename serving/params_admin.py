"""The admin endpoint of a serving process: status, pin, rollback and unpin of its parameters.

``headwater serve --admin-port P`` starts it; ``headwater params status|pin|rollback|unpin``
talks to it. HTTP rather than a gRPC service: it is an operator's tool next to ``/metrics``
(curl works, no stubs), and it stays off the public ``headwater.v1`` API, its port and its
auth. It has no auth of its own, so it binds loopback unless ``--admin-host`` says otherwise.
The processes of ``serve --processes N`` share the port (``SO_REUSEPORT``): any one answers,
and its commands reach all of them through Kafka.

Routes (JSON bodies; errors are ``{"code": CODE, "message": ...}`` with the gRPC code names):

- ``GET /admin/params``: this replica's :meth:`ParamServer.params_status`.
- ``POST /admin/params/pin`` ``{"version": V}``: checks that this replica holds ``V``
  (404 NOT_FOUND if not, 400 INVALID_ARGUMENT for a version that is no integer), writes a
  ``pin`` control message to every partition of ``hw.params`` (so every replica that follows
  the topic acts on it, within its poll interval), waits until this replica serves ``V`` and
  answers with its status.
- ``POST /admin/params/rollback``: pins the newest held version older than the one served
  (400 FAILED_PRECONDITION when there is none).
- ``POST /admin/params/unpin``: every replica follows the newest version again.

Kafka unreachable: 503 UNAVAILABLE; a replica that did not act within the timeout: 504.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from paramsync import CONTROL, CONTROL_SHARD, ControlCommand, ParamsMessage, encode_params, params_partitions

log = logging.getLogger(__name__)

__all__ = ["ParamsAdmin", "ParamsStatus", "AdminError", "HTTP_STATUS", "admin_request"]

HTTP_STATUS = {"OK": HTTPStatus.OK, "INVALID_ARGUMENT": HTTPStatus.BAD_REQUEST,
               "FAILED_PRECONDITION": HTTPStatus.BAD_REQUEST, "NOT_FOUND": HTTPStatus.NOT_FOUND,
               "UNAVAILABLE": HTTPStatus.SERVICE_UNAVAILABLE,
               "DEADLINE_EXCEEDED": HTTPStatus.GATEWAY_TIMEOUT, "INTERNAL": HTTPStatus.INTERNAL_SERVER_ERROR}


@dataclass(frozen=True, slots=True)
class ParamsStatus:
    """One replica's parameters as ``headwater params status`` shows them: the version served,
    whether pinned, the versions held, freshness, and the shard (:meth:`to_json`: the
    ``status`` of every answer)."""

    model_id: str
    ready: bool
    version: int
    newest_version: int  # the newest version seen on the partition, applied or held back
    pinned_version: int | None  # None: following the newest
    held_versions: tuple[int, ...]  # what pin and rollback can go back to
    history_bytes: int
    watermark_ms: int
    freshness_lag_ms: int
    partition: int
    shard: str  # "i/N"
    error: str | None  # why the replica stopped following, if it did

    @property
    def pinned(self) -> bool:
        return self.pinned_version is not None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "pinned": self.pinned, "held_versions": list(self.held_versions)}


class AdminError(Exception):
    """An admin request that cannot be done: ``code`` (a gRPC code name) and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    allow_reuse_port = True  # the processes of `serve --processes N` share one admin port
    daemon_threads = True


class ParamsAdmin:
    """Serves the routes of the module docstring for one :class:`serving.param_server.ParamServer`."""

    def __init__(self, ps: Any, host: str, port: int, timeout_s: float = 10.0) -> None:
        self.ps, self.timeout_s = ps, timeout_s
        self._producer: Any = None
        self._lock = threading.Lock()  # one command at a time from this process
        admin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                admin._dispatch(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                admin._dispatch(self, "POST")

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("admin %s: " + fmt, self.client_address[0], *args)

        try:
            self.server = _Server((host, port), Handler)
        except OSError as exc:
            raise OSError(f"cannot serve the params admin endpoint on {host}:{port}: {exc}") from None
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="params-admin", daemon=True)

    def start(self) -> "ParamsAdmin":
        self._thread.start()
        log.info("params admin on http://%s:%d/admin/params", self.server.server_address[0], self.port)
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._producer is not None:
            self._producer.close(timeout=5)

    # -- HTTP ------------------------------------------------------------------------------------
    def _dispatch(self, req: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(req.path)
        try:
            route = {("GET", "/admin/params"): self.status, ("POST", "/admin/params/pin"): self.pin,
                     ("POST", "/admin/params/rollback"): self.rollback,
                     ("POST", "/admin/params/unpin"): self.unpin}.get((method, url.path.rstrip("/")))
            if route is None:
                raise AdminError("NOT_FOUND", f"no admin route {method} {url.path} (see GET /admin/params)")
            body = route(**self._arguments(req, url)) if route == self.pin else route()
            self._reply(req, "OK", body)
        except AdminError as exc:
            self._reply(req, exc.code, {"code": exc.code, "message": exc.message})
        except Exception as exc:  # never let one request take the endpoint down
            log.exception("params admin request failed")
            self._reply(req, "INTERNAL", {"code": "INTERNAL", "message": f"{type(exc).__name__}: {exc}"})

    @staticmethod
    def _arguments(req: BaseHTTPRequestHandler, url: Any) -> dict[str, Any]:
        args: dict[str, Any] = {k: v[-1] for k, v in parse_qs(url.query).items()}
        size = int(req.headers.get("Content-Length") or 0)
        if size:
            try:
                body = json.loads(req.rfile.read(min(size, 1 << 16)))
            except ValueError:
                raise AdminError("INVALID_ARGUMENT", "the request body is not JSON") from None
            if not isinstance(body, dict):
                raise AdminError("INVALID_ARGUMENT", 'the request body must be a JSON object like {"version": 12}')
            args.update(body)
        return {"version": args.get("version")}

    @staticmethod
    def _reply(req: BaseHTTPRequestHandler, code: str, body: dict) -> None:
        data = json.dumps(body).encode()
        req.send_response(HTTP_STATUS.get(code, HTTPStatus.INTERNAL_SERVER_ERROR))
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    # -- the commands ----------------------------------------------------------------------------
    def status(self) -> dict:
        return {"code": "OK", "status": self.ps.params_status().to_json()}

    def pin(self, version: Any = None) -> dict:
        if isinstance(version, bool) or version is None:
            raise AdminError("INVALID_ARGUMENT", 'pin needs a version: {"version": 12}')
        try:
            v = int(version)
        except (TypeError, ValueError):
            raise AdminError("INVALID_ARGUMENT", f"version must be an integer, got {version!r}") from None
        if v < 0 or (isinstance(version, float) and not version.is_integer()):
            raise AdminError("INVALID_ARGUMENT", f"version must be a non-negative integer, got {version!r}")
        self._usable()
        why = self.ps.pinnable(v)
        if why is not None:
            raise AdminError("NOT_FOUND", why)
        return self._command(ControlCommand("pin", v, random.getrandbits(62)))

    def rollback(self) -> dict:
        self._usable()
        target = self.ps.previous_version()
        if target is None:
            st = self.ps.params_status()
            raise AdminError("FAILED_PRECONDITION", f"no version older than the one served ({st.version}) "
                             f"is held (held: {list(st.held_versions) or 'none'}); nothing to roll back to")
        return self._command(ControlCommand("pin", target, random.getrandbits(62)))

    def unpin(self) -> dict:
        self._usable()
        return self._command(ControlCommand("unpin", -1, random.getrandbits(62)))

    def _usable(self) -> None:
        if self.ps.error is not None:
            raise AdminError("UNAVAILABLE", f"the parameter server stopped: {self.ps.error}")
        if not self.ps.ready:
            raise AdminError("FAILED_PRECONDITION", "no model loaded yet (waiting for a snapshot on hw.params)")

    def _command(self, cmd: ControlCommand) -> dict:
        """Writes ``cmd`` to every partition, then waits until this replica has acted on it."""
        with self._lock:
            try:
                self._publish(cmd)
            except Exception as exc:  # kafka-python raises many types for one "unreachable"
                raise AdminError("UNAVAILABLE", f"could not write the command to {self.ps.topic}: {exc}") from None
            deadline = time.monotonic() + self.timeout_s
            while time.monotonic() < deadline:
                result = self.ps.command_result(cmd.command_id)
                if result is not None:
                    if not result.ok:
                        raise AdminError(result.code, result.message)
                    status = self.ps.params_status()
                    if cmd.action == "unpin" or status.version == cmd.version:
                        return {"code": "OK", "message": result.message, "status": status.to_json()}
                time.sleep(0.01)
            raise AdminError("DEADLINE_EXCEEDED", f"{cmd.action} was written to {self.ps.topic} but this "
                             f"replica has not acted on it within {self.timeout_s:g} s")

    def _publish(self, cmd: ControlCommand) -> None:
        from kafka import KafkaProducer

        from paramsync import bootstrap_offset

        ps = self.ps
        if self._producer is None:
            self._producer = KafkaProducer(bootstrap_servers=ps.bootstrap_servers, acks="all", linger_ms=0,
                                           client_id="hw-params-admin")
        n = ps.cfg.num_shards
        futures = []
        for p in range(params_partitions(n)):
            shard = p if n == 1 or p < n else CONTROL_SHARD
            # The newest snapshot's offset, as every message carries: bootstrapping replicas read
            # the last message of the partition, which may be this one.
            snap = bootstrap_offset(ps.bootstrap_servers, ps.topic, partition=p)
            msg = ParamsMessage(kind=CONTROL, model_id=ps.cfg.model_id, version=cmd.version,
                                snapshot_offset=snap, shard=0 if n == 1 else shard, num_shards=n,
                                publish_id=cmd.command_id, payload=cmd.encode())
            futures.append(self._producer.send(ps.topic, value=encode_params(msg),
                                               key=ps.cfg.model_id.encode(), partition=p))
        self._producer.flush(timeout=10)
        for f in futures:
            f.get(timeout=10)
        log.info("wrote %s to %s (%d partitions)", f"pin {cmd.version}" if cmd.action == "pin" else cmd.action,
                 ps.topic, len(futures))


def admin_request(address: str, method: str, path: str, body: dict | None = None,
                  timeout_s: float = 30.0) -> tuple[str, dict]:
    """One call to an admin endpoint at ``host:port`` (or a URL): ``(code, body)``; an endpoint
    that cannot be reached is ``UNAVAILABLE`` with a message saying how to start one."""
    import urllib.error
    import urllib.request

    base = address if "://" in address else f"http://{address}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base.rstrip("/") + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return "OK", json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            got = json.loads(exc.read() or b"{}")
        except ValueError:
            got = {}
        return str(got.get("code", "INTERNAL")), got or {"message": f"HTTP {exc.code}"}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return "UNAVAILABLE", {"message": f"cannot reach the params admin endpoint at {base} ({reason}); "
                                          "start headwater serve with --admin-port PORT and pass --admin HOST:PORT"}

"""Load drivers for overload checks: a closed loop that finds the sustainable rate, and an open
loop that offers a fixed rate whatever the server does (the way real clients overload a server).

Used by ``tests/hardening`` and ``headwater bench overload``. Both drivers work over real
sockets: httpx for the HTTP server, gRPC futures for the recommender. The expected bound on the
latency of admitted requests follows from the admission limit: a request let in behind at most
``limit - 1`` others waits about ``limit / sustainable_rps`` and is then served, so
:func:`admitted_latency_bound` is that plus the service time measured at saturation.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["LoadResult", "admitted_latency_bound", "closed_loop_grpc", "closed_loop_http", "open_loop_grpc", "run_http_load",
           "open_loop_http", "rss_bytes"]


@dataclass
class LoadResult:
    """What one load phase saw: admitted latencies, refusals, and anything else (errors)."""

    offered_rps: float | None  # None: a closed loop (offers whatever the server takes)
    duration_s: float
    ok: int = 0
    rejected: int = 0  # 429 / RESOURCE_EXHAUSTED
    rejected_with_retry_after: int = 0
    other: dict[str, int] = field(default_factory=dict)  # status -> count (must stay empty)
    latencies_s: list[float] = field(default_factory=list)  # admitted requests only
    rejected_latencies_s: list[float] = field(default_factory=list)  # how fast refusals come back

    @property
    def achieved_rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) if self.latencies_s else float("nan")

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("latencies_s")
        rej = d.pop("rejected_latencies_s")
        d.update(achieved_rps=round(self.achieved_rps, 2), p50_s=round(self.p(50), 4) if self.ok else None,
                 p99_s=round(self.p(99), 4) if self.ok else None,
                 rejected_p99_s=round(float(np.percentile(rej, 99)), 4) if rej else None)
        return d

    def _record(self, status: str, latency: float, retry_after: bool = False) -> None:
        if status == "ok":
            self.ok += 1
            self.latencies_s.append(latency)
        elif status == "rejected":
            self.rejected += 1
            self.rejected_latencies_s.append(latency)
            self.rejected_with_retry_after += int(retry_after)
        else:
            self.other[status] = self.other.get(status, 0) + 1


def admitted_latency_bound(limit: int, sustainable_rps: float, service_p99_s: float) -> float:
    """Seconds an admitted request should take at most: the queue ahead of it, then its own service."""
    return limit / max(sustainable_rps, 1e-9) + service_p99_s


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# -- HTTP ------------------------------------------------------------------------------------


async def _post(host: str, port: int, path: str, payload: bytes, timeout_s: float) -> tuple[int, dict[str, str]]:
    """One POST on its own connection, by hand: httpx costs the load generator more CPU per
    request than the server spends refusing one, and would measure itself."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        await asyncio.wait_for(reader.read(), timeout_s)  # the body, to the close
        return int(lines[0].split()[1]), headers
    finally:
        writer.close()


async def _http_call(target: tuple[str, int, str, bytes, float], result: LoadResult) -> None:
    host, port, path, payload, timeout_s = target
    t0 = time.perf_counter()
    try:
        status, headers = await _post(host, port, path, payload, timeout_s)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        result._record(type(exc).__name__, 0.0)
        return
    latency = time.perf_counter() - t0
    if status == 200:
        result._record("ok", latency)
    elif status == 429:
        ra = headers.get("retry-after", "")
        result._record("rejected", latency, retry_after=ra.isdigit() and int(ra) >= 1)
    else:
        result._record(str(status), latency)


def _target(base_url: str, path: str, body: dict, timeout_s: float) -> tuple[str, int, str, bytes, float]:
    import json
    from urllib.parse import urlsplit

    u = urlsplit(base_url)
    return u.hostname or "127.0.0.1", u.port or 80, path, json.dumps(body).encode(), timeout_s


async def _closed_http(base_url: str, path: str, body: dict, concurrency: int, duration_s: float,
                       timeout_s: float) -> LoadResult:
    result = LoadResult(offered_rps=None, duration_s=duration_s)
    target = _target(base_url, path, body, timeout_s)
    end = time.perf_counter() + duration_s

    async def worker() -> None:
        while time.perf_counter() < end:
            await _http_call(target, result)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.duration_s = time.perf_counter() - t0
    return result


async def _open_http(base_url: str, path: str, body: dict, rate: float, duration_s: float,
                     timeout_s: float) -> LoadResult:
    result = LoadResult(offered_rps=rate, duration_s=duration_s)
    target = _target(base_url, path, body, timeout_s)
    n = max(int(rate * duration_s), 1)
    t0 = time.perf_counter()
    tasks = []
    for i in range(n):  # request i leaves at t0 + i / rate, whether or not earlier ones returned
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_http_call(target, result)))
    await asyncio.gather(*tasks)
    return result


def closed_loop_http(base_url: str, path: str, body: dict, concurrency: int, duration_s: float,
                     timeout_s: float = 60.0) -> LoadResult:
    """``concurrency`` clients each sending the next request when the last returns."""
    return asyncio.run(_closed_http(base_url, path, body, concurrency, duration_s, timeout_s))


def open_loop_http(base_url: str, path: str, body: dict, rate: float, duration_s: float,
                   timeout_s: float = 60.0) -> LoadResult:
    """``rate`` requests per second for ``duration_s``, sent on schedule."""
    return asyncio.run(_open_http(base_url, path, body, rate, duration_s, timeout_s))


# -- gRPC ------------------------------------------------------------------------------------


def _grpc_status(exc: BaseException | None) -> str:
    import grpc

    if exc is None:
        return "ok"
    code = exc.code() if isinstance(exc, grpc.RpcError) else None
    return "rejected" if code == grpc.StatusCode.RESOURCE_EXHAUSTED else str(getattr(code, "name", exc))


def closed_loop_grpc(call: Callable, request: Any, concurrency: int, duration_s: float,
                     timeout_s: float = 60.0) -> LoadResult:
    """``concurrency`` threads calling ``call(request)`` back to back."""
    result = LoadResult(offered_rps=None, duration_s=duration_s)
    lock = threading.Lock()
    end = time.perf_counter() + duration_s

    def worker() -> None:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                call(request, timeout=timeout_s)
                exc = None
            except Exception as e:  # noqa: BLE001 - classified below
                exc = e
            with lock:
                result._record(_grpc_status(exc), time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.duration_s = time.perf_counter() - t0
    return result


def open_loop_grpc(call: Any, request: Any, rate: float, duration_s: float, timeout_s: float = 60.0) -> LoadResult:
    """``rate`` calls per second via ``call.future`` (non-blocking), sent on schedule."""
    result = LoadResult(offered_rps=rate, duration_s=duration_s)
    lock = threading.Lock()
    n = max(int(rate * duration_s), 1)
    done = threading.Semaphore(0)
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter()

        def finished(fut: Any, sent: float = sent) -> None:
            latency = time.perf_counter() - sent
            with lock:
                result._record(_grpc_status(fut.exception()), latency)
            done.release()

        call.future(request, timeout=timeout_s).add_done_callback(finished)
    for _ in range(n):
        done.acquire()
    return result


# -- a driver in its own process ------------------------------------------------------------
# The load generator must not share the server's interpreter: its GIL and event loop would be
# the bottleneck measured. ``run_http_load`` starts ``python -m serving.http.overload`` and reads
# one JSON line back (plain data, no pickle across the process boundary).


def run_http_load(base_url: str, path: str, body: dict, mode: str, amount: float, duration_s: float,
                  timeout_s: float = 60.0) -> LoadResult:
    """``mode="closed"`` (``amount`` = concurrency) or ``"open"`` (``amount`` = rate) from a child process."""
    import json
    import subprocess
    import sys

    args = json.dumps({"base_url": base_url, "path": path, "body": body, "mode": mode, "amount": amount,
                       "duration_s": duration_s, "timeout_s": timeout_s})
    out = subprocess.run([sys.executable, "-m", "serving.http.overload", args], capture_output=True, text=True,
                         timeout=duration_s + timeout_s + 60, check=True).stdout
    return LoadResult(**json.loads(out.strip().splitlines()[-1]))


def _main(argv: list[str]) -> None:
    import json

    a = json.loads(argv[0])
    if a["mode"] == "closed":
        r = closed_loop_http(a["base_url"], a["path"], a["body"], int(a["amount"]), a["duration_s"], a["timeout_s"])
    else:
        r = open_loop_http(a["base_url"], a["path"], a["body"], float(a["amount"]), a["duration_s"], a["timeout_s"])
    print(json.dumps(asdict(r)))  # noqa: T201 - the parent reads this line


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])

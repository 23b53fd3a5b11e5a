"""The torchrun environment, process-group set-up, and a launcher that spawns N ranks itself.

The launcher sets exactly the variables ``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so ``headwater train --nproc N`` and
``torchrun --nproc-per-node N --no-python headwater train`` run the same code path.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from streams.broker import free_port, stop_processes

log = logging.getLogger(__name__)

__all__ = ["DistEnv", "init_process_group", "spawn_ranks"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits among the ranks (read from torchrun's environment variables)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "DistEnv":
        env = os.environ if env is None else env
        try:
            out = cls(rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
                      local_rank=int(env.get("LOCAL_RANK", env.get("RANK", 0))),
                      master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                      master_port=int(env.get("MASTER_PORT", 29500)))
        except ValueError as exc:
            raise ValueError(f"bad torchrun environment variable: {exc}") from None
        if out.world_size < 1 or not 0 <= out.rank < out.world_size:
            raise ValueError(f"RANK {out.rank} out of range for WORLD_SIZE {out.world_size}")
        return out


def init_process_group(env: DistEnv, backend: str = "", timeout_s: float = 300.0) -> str:
    """Joins the default process group: gloo unless ``backend`` says otherwise.

    The trainer keeps its table shards and its tower on the CPU (``make_table(device="cpu")``),
    so the exchange tensors are CPU tensors, which NCCL cannot carry; ``backend="nccl"`` is for a
    trainer whose tensors live on the GPU.
    """
    import datetime

    import torch
    import torch.distributed as dist

    backend = backend or "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d/%d joined the %s process group at %s:%d", env.rank, env.world_size,
             backend, env.master_addr, env.master_port)
    return backend


def rank_env(rank: int, nproc: int, port: int, addr: str = "127.0.0.1") -> dict[str, str]:
    """The torchrun variables of one local rank."""
    return {"RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": addr, "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def spawn_ranks(nproc: int, argv: Sequence[str], env: Mapping[str, str] | None = None,
                timeout_s: float | None = None, quiet_ranks: bool = True) -> list[int]:
    """Runs ``argv`` as ``nproc`` local ranks; returns their exit codes.

    SIGTERM/SIGINT to the launcher are forwarded to every rank (each stops cleanly and
    checkpoints). If one rank fails the others are terminated: a rank alone would block forever
    in its next collective. With ``quiet_ranks`` only rank 0's stdout is kept (it prints the
    summary); stderr (logs) of every rank is inherited.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    port = free_port()
    base = dict(os.environ if env is None else env)
    procs = [subprocess.Popen(list(argv), env={**base, **rank_env(r, nproc, port)},
                              stdout=subprocess.DEVNULL if (quiet_ranks and r > 0) else None)
             for r in range(nproc)]

    def forward(_signum: int, _frame: object) -> None:
        # Always SIGTERM: after Ctrl-C the terminal has already sent every rank a SIGINT, and a
        # second SIGINT would interrupt a rank instead of letting it stop cleanly.
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)} \
        if _main_thread() else {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while [p.poll() for p in procs].count(None):  # poll() every rank: it sets returncode
            failed = [p for p in procs if p.returncode not in (None, 0)]
            late = deadline is not None and time.monotonic() > deadline
            if failed or late:
                log.error("rank failed (exit %s) or timed out; stopping the others",
                          [p.returncode for p in procs])
                stop_processes(procs)
                break
            time.sleep(0.05)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return [int(p.returncode) for p in procs]


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def headwater_argv(args: Sequence[str]) -> list[str]:
    """``python -m headwater <args>`` with this interpreter (the rank processes' command line)."""
    return [sys.executable, "-m", "headwater", *args]

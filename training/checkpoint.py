"""Crash-safe checkpoints: the table, the dense model + optimizer, and the offsets they cover.

Layout of a checkpoint directory::

    table/                      the embedding table's RocksDB (saved incrementally in place)
    state-<seq>.safetensors     dense tower, dense optimizer, de-dup filter, evaluator (tensors;
                                non-tensor parts as JSON in the safetensors metadata)
    MANIFEST.json               written LAST: which state file, which table version, and the
                                consumer offsets (next offset to read) this state corresponds to

Order of a write: table save -> state file (temp, fsync, rename) -> manifest (temp, fsync,
rename, fsync dir). A crash at any point leaves the previous manifest intact and pointing at a
state file that still exists (we only delete state files older than the previous one). The table
directory may then be *ahead* of the manifest (it kept rows trained after the manifest's
offsets); resuming replays those examples once more: at-least-once, never a lost example.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["CheckpointManifest", "CheckpointStore", "atomic_write_bytes",
           "optimizer_to_tensors", "optimizer_from_tensors"]

MANIFEST = "MANIFEST.json"
FORMAT = 1
_STATE_RE = re.compile(r"^state-(\d+)\.safetensors$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class CheckpointManifest:
    """What one checkpoint holds; ``offsets`` maps "topic:partition" to the next offset to read."""

    seq: int
    state_file: str
    offsets: dict[str, int]
    table_version: int
    examples_trained: int = 0
    watermark_ms: int = -1
    created_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT

    def offsets_by_partition(self) -> dict[tuple[str, int], int]:
        out = {}
        for key, off in self.offsets.items():
            topic, _, part = key.rpartition(":")
            out[(topic, int(part))] = int(off)
        return out

    @staticmethod
    def offsets_key(offsets: dict[tuple[str, int], int]) -> dict[str, int]:
        return {f"{t}:{p}": int(o) for (t, p), o in sorted(offsets.items())}


class CheckpointStore:
    """Reads and writes the checkpoints of one trainer under ``root``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def table_path(self) -> Path:
        return self.root / "table"

    def latest(self) -> CheckpointManifest | None:
        """The last complete checkpoint, or None; a corrupt manifest is an error, not a fresh start."""
        path = self.root / MANIFEST
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text())
            manifest = CheckpointManifest(**raw)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"checkpoint manifest {path} is unreadable: {exc}") from None
        if manifest.format != FORMAT:
            raise ValueError(f"checkpoint format {manifest.format} not supported (want {FORMAT})")
        if not (self.root / manifest.state_file).exists():
            raise ValueError(f"checkpoint manifest names missing file {manifest.state_file}")
        return manifest

    def write(self, table: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
              offsets: dict[tuple[str, int], int], table_version: int, examples_trained: int = 0,
              watermark_ms: int = -1, extra: dict[str, Any] | None = None) -> CheckpointManifest:
        """Persists one checkpoint; returns its manifest once it is durable."""
        from safetensors.torch import save

        prev = self.latest()
        seq = (prev.seq + 1) if prev else 1
        t0 = time.perf_counter()
        if table is not None:
            table.save(str(self.table_path), incremental=True)
        t1 = time.perf_counter()
        state_file = f"state-{seq:08d}.safetensors"
        blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                    metadata=dict(metadata))
        atomic_write_bytes(self.root / state_file, blob)
        manifest = CheckpointManifest(seq=seq, state_file=state_file,
                                      offsets=CheckpointManifest.offsets_key(offsets),
                                      table_version=int(table_version),
                                      examples_trained=int(examples_trained),
                                      watermark_ms=int(watermark_ms), created_s=time.time(),
                                      extra=dict(extra or {}))
        atomic_write_bytes(self.root / MANIFEST, json.dumps(asdict(manifest), indent=1).encode())
        self._prune(keep={state_file, prev.state_file if prev else ""})
        log.info("checkpoint %d: table %.0f ms, state %d KiB, offsets %s", seq, (t1 - t0) * 1000,
                 len(blob) // 1024, manifest.offsets)
        return manifest

    def load_state(self, manifest: CheckpointManifest) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from safetensors import safe_open

        path = self.root / manifest.state_file
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, meta

    def _prune(self, keep: set[str]) -> None:
        for p in self.root.iterdir():
            if _STATE_RE.match(p.name) and p.name not in keep:
                p.unlink(missing_ok=True)


# ---------------------------------------------------------------- torch optimizer <-> tensors


def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str = "opt.") -> tuple[dict[str, torch.Tensor], str]:
    """Flattens ``opt.state_dict()`` into named tensors plus a JSON string of the rest."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{prefix}{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    return tensors, json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta_json: str, prefix: str = "opt.") -> None:
    """Inverse of :func:`optimizer_to_tensors`."""
    meta = json.loads(meta_json)
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if not name.startswith(prefix):
            continue
        idx, key = name[len(prefix):].split(".", 1)
        state.setdefault(int(idx), {})[key] = val.clone()  # never alias the caller's tensors
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})

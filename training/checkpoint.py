"""Crash-safe checkpoints: the table, the dense model + optimizer, and the offsets they cover.

Layout of a checkpoint directory::

    tables/<seq>/               the embedding table of checkpoint <seq> (RocksDB): a hard-linked
                                copy of the previous checkpoint's table, saved incrementally
    state-<seq>.safetensors     dense tower, dense optimizer, de-dup filter, evaluator (tensors;
                                non-tensor parts as JSON in the safetensors metadata)
    MANIFEST.json               written LAST: which table directory, which state file (and its
                                sha256), which table version, and the consumer offsets (next
                                offset to read) this state corresponds to
    MANIFEST.prev.json          the previous manifest: the fallback when the newest checkpoint
                                fails its checks (truncated, bit-flipped, missing)

Order of a write: table into a directory of its own (never one a manifest names), fsync ->
state file (temp, fsync, rename) -> manifest (temp, fsync, rename, fsync dir). A crash at any
point (kill -9 between the table and the manifest included) leaves the previous manifest intact
and pointing at a table, a state file and offsets that are one consistent cut: a restart reads
only the last complete manifest, so what it trains again is exactly what that state has not
learned, and the de-dup filter in the same state knows every id it has. (Before the table had a
directory per checkpoint, one table saved in place could be *ahead* of the manifest, and the
examples in between updated their rows twice.) Only the tables and state files of the newest two
manifests are kept.

Integrity: :meth:`CheckpointStore.latest` verifies the state file's sha256 against its manifest
and that its table directory exists (the table checks its own records when loaded). A mismatch
logs an error naming the file and falls back to the previous checkpoint (whose offsets are
older, so the fallback only replays more: still at-least-once); when no checkpoint verifies, it
raises :class:`CheckpointCorruptError` and the trainer refuses to start rather than train on
garbage. Manifests of the older layout (one ``table/`` saved in place) are still read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["CheckpointCorruptError", "CheckpointManifest", "CheckpointStore", "atomic_write_bytes",
           "optimizer_to_tensors", "optimizer_from_tensors"]

MANIFEST = "MANIFEST.json"
PREV_MANIFEST = "MANIFEST.prev.json"
TABLES = "tables"
LEGACY_TABLE = "table"  # the older layout: one table saved in place, ahead of its manifest after a crash
FORMAT = 1
_STATE_RE = re.compile(r"^state-(\d+)\.safetensors$")


class CheckpointCorruptError(ValueError):
    """No usable checkpoint: its manifest is unreadable or its state file is missing or fails
    its sha256 (a ValueError, as corrupt checkpoints always were)."""


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (state files may be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    state_sha256: str = ""  # empty: written before checksums (not verified)
    table_dir: str = ""  # relative to the store; empty: no table, or the older layout's table/

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
        self._good: CheckpointManifest | None = None  # last manifest this store wrote (verified)

    def table_path_of(self, manifest: CheckpointManifest) -> Path:
        """The table directory of ``manifest`` (load the table from there, with its state)."""
        return self.root / (manifest.table_dir or LEGACY_TABLE)

    @property
    def table_path(self) -> Path:
        """The table of the newest usable checkpoint (``table/`` when there is none)."""
        manifest = self.latest()
        return self.table_path_of(manifest) if manifest is not None else self.root / LEGACY_TABLE

    def latest(self) -> CheckpointManifest | None:
        """The newest checkpoint whose state file verifies, or None when there is none yet.

        A corrupt newest checkpoint falls back to the previous one with an error in the log; a
        store with checkpoints but none usable raises :class:`CheckpointCorruptError` (never a
        silent fresh start, which would retrain from the topic's start).
        """
        if not (self.root / MANIFEST).exists():
            return None
        try:
            return self._verified(MANIFEST)
        except CheckpointCorruptError as exc:
            if not (self.root / PREV_MANIFEST).exists():
                log.error("checkpoint in %s is corrupt and there is no previous one: %s", self.root, exc)
                raise
            try:
                prev = self._verified(PREV_MANIFEST)
            except CheckpointCorruptError as exc2:
                log.error("checkpoint in %s is corrupt (%s) and so is the previous one (%s)", self.root, exc, exc2)
                raise CheckpointCorruptError(f"no usable checkpoint in {self.root}: {exc}; previous: {exc2}") from None
            log.error("checkpoint in %s is corrupt (%s); falling back to the previous checkpoint %d "
                      "(offsets %s; examples after them are replayed)", self.root, exc, prev.seq, prev.offsets)
            return prev

    def _read(self, name: str) -> CheckpointManifest:
        path = self.root / name
        try:
            manifest = CheckpointManifest(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise CheckpointCorruptError(f"checkpoint manifest {path} is unreadable: {exc}") from None
        if manifest.format != FORMAT:
            raise CheckpointCorruptError(f"checkpoint format {manifest.format} not supported (want {FORMAT})")
        return manifest

    def _verified(self, name: str) -> CheckpointManifest:
        manifest = self._read(name)
        state = self.root / manifest.state_file
        if not state.exists():
            raise CheckpointCorruptError(f"checkpoint manifest {name} names missing file {manifest.state_file}")
        if manifest.state_sha256 and file_sha256(state) != manifest.state_sha256:
            raise CheckpointCorruptError(f"state file {state} fails its sha256 (truncated or corrupted)")
        if manifest.table_dir and not (self.root / manifest.table_dir).is_dir():
            raise CheckpointCorruptError(f"checkpoint manifest {name} names missing table {manifest.table_dir}")
        return manifest

    def find(self, seq: int) -> CheckpointManifest | None:
        """The kept checkpoint ``seq`` (this store's newest two), verified; None when not kept.

        An outer manifest (the sharded one) names a checkpoint of this store by ``seq``; this
        store's own newest may be ahead of it, when a crash came between the two manifests."""
        for name in (MANIFEST, PREV_MANIFEST):
            if not (self.root / name).exists():
                continue
            try:
                if self._read(name).seq == seq:
                    return self._verified(name)
            except CheckpointCorruptError as exc:
                log.warning("checkpoint manifest %s in %s: %s", name, self.root, exc)
        return None

    def continue_from(self, manifest: CheckpointManifest) -> None:
        """Makes ``manifest`` the base of the next write (its table is copied, it is kept as the
        fallback), whatever this store's own newest manifest says: the checkpoint a restart
        resumed from, when an outer manifest chose an older one than this store's newest."""
        self._good = manifest

    def _newest_readable(self) -> CheckpointManifest | None:
        """The manifest to continue the sequence from (no hashing: only ``seq`` matters)."""
        for name in (MANIFEST, PREV_MANIFEST):
            if (self.root / name).exists():
                try:
                    return self._read(name)
                except CheckpointCorruptError:
                    continue
        return None

    def write(self, table: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
              offsets: dict[tuple[str, int], int], table_version: int, examples_trained: int = 0,
              watermark_ms: int = -1, extra: dict[str, Any] | None = None) -> CheckpointManifest:
        """Persists one checkpoint; returns its manifest once it is durable."""
        from safetensors.torch import save

        # The previous checkpoint must be a verified one: it is the fallback this write keeps.
        try:
            prev = self._good or self.latest()
        except CheckpointCorruptError:
            prev = None
        newest = self._newest_readable()
        seq = max(prev.seq if prev else 0, newest.seq if newest else 0) + 1
        t0 = time.perf_counter()
        table_dir = self._save_table(table, seq, prev) if table is not None else ""
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
                                      extra=dict(extra or {}),
                                      state_sha256=hashlib.sha256(blob).hexdigest(),
                                      table_dir=table_dir)
        if prev is not None:
            atomic_write_bytes(self.root / PREV_MANIFEST, json.dumps(asdict(prev), indent=1).encode())
        atomic_write_bytes(self.root / MANIFEST, json.dumps(asdict(manifest), indent=1).encode())
        self._good = manifest
        self._prune(keep={state_file, prev.state_file if prev else ""},
                    keep_tables={table_dir, prev.table_dir if prev else ""})
        log.info("checkpoint %d: table %.0f ms, state %d KiB, offsets %s", seq, (t1 - t0) * 1000,
                 len(blob) // 1024, manifest.offsets)
        return manifest

    def load_state(self, manifest: CheckpointManifest) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and metadata of ``manifest``'s state file, verified against its sha256."""
        from safetensors.torch import load

        path = self.root / manifest.state_file
        data = path.read_bytes()
        if manifest.state_sha256 and hashlib.sha256(data).hexdigest() != manifest.state_sha256:
            raise CheckpointCorruptError(f"state file {path} fails its sha256 (truncated or corrupted)")
        try:
            tensors = load(data)
            meta = _safetensors_metadata(data)
        except Exception as exc:  # a header safetensors rejects: same verdict as a bad checksum
            raise CheckpointCorruptError(f"state file {path} is unreadable: {exc}") from None
        return tensors, meta

    def _save_table(self, table: Any, seq: int, prev: CheckpointManifest | None) -> str:
        """Saves ``table`` into a directory of its own for checkpoint ``seq`` and returns it
        (relative): a hard-linked copy of ``prev``'s table updated incrementally, or a full save."""
        from embedding_store.persistence import link_snapshot

        rel = f"{TABLES}/{seq:08d}"
        dst = self.root / rel
        shutil.rmtree(dst, ignore_errors=True)  # left by a write that crashed before its manifest
        dst.parent.mkdir(parents=True, exist_ok=True)
        base = self.table_path_of(prev) if prev is not None else None
        if base is not None and base.is_dir():
            try:
                link_snapshot(table, str(base), str(dst))
            except Exception as exc:  # unreadable: a full save instead
                log.warning("checkpoint %d: cannot copy the previous table %s (%s); saving in full",
                            seq, base, exc)
                shutil.rmtree(dst, ignore_errors=True)
        table.save(str(dst), incremental=True)
        _fsync_tree(dst)
        _fsync_dir(dst.parent)
        return rel

    def _prune(self, keep: set[str], keep_tables: set[str]) -> None:
        for p in self.root.iterdir():
            if _STATE_RE.match(p.name) and p.name not in keep:
                p.unlink(missing_ok=True)
        tables = self.root / TABLES
        if tables.is_dir():
            for p in tables.iterdir():
                if f"{TABLES}/{p.name}" not in keep_tables:
                    shutil.rmtree(p, ignore_errors=True)
        legacy = self.root / LEGACY_TABLE
        if "" not in keep_tables and legacy.is_dir():  # no manifest kept reads the older layout
            shutil.rmtree(legacy, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """fsyncs every file under ``root`` and the directories holding them."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (header: u64 length, then JSON)."""
    (n,) = struct.unpack_from("<Q", data)
    if n > len(data) - 8:
        raise ValueError("header length exceeds the file")
    return dict(json.loads(data[8:8 + n]).get("__metadata__") or {})


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

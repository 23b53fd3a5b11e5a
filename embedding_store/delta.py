"""Table deltas: the rows changed since a version, and their compact binary wire encoding.

The wire format is plain bytes (no pickle), so a delta can cross processes (training publishes
chunks on Kafka, serving applies them). One chunk carries one slot's slice:

    header  struct "<4sHHqqIIIH"  magic b"HWD1", format version, flags (bit 0: fp16 values),
            from_version, to_version, dim, n_ids, n_deleted, len(slot name)
    slot name (utf-8), then per state tensor name lengths (only with flag bit 1), then
    ids int64[n_ids] | values f32/f16[n_ids, dim] | state... | deleted int64[n_deleted]
    crc32 of everything before it (uint32)

Little-endian throughout. ``decode_delta`` verifies magic, sizes and checksum and raises
:class:`DeltaFormatError` on anything else.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

MAGIC = b"HWD1"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHHqqIIIH")
_FLAG_FP16 = 1
_FLAG_STATE = 2


class DeltaFormatError(ValueError):
    """A delta chunk that is truncated, corrupted or of an unknown format."""


@dataclass
class SlotDelta:
    """One slot's changes: upserted ``ids`` with their ``values`` ``[k, dim]`` (and optimizer
    ``state`` tensors when exported with state) and ``deleted_ids`` (expired rows)."""

    ids: np.ndarray
    values: torch.Tensor
    deleted_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    state: dict[str, torch.Tensor] | None = None


@dataclass
class TableDelta:
    """The changes of a table between ``from_version`` (exclusive) and ``to_version``."""

    from_version: int
    to_version: int
    slots: dict[str, SlotDelta]

    @property
    def num_rows(self) -> int:
        return sum(int(s.ids.size) for s in self.slots.values())

    @property
    def num_deleted(self) -> int:
        return sum(int(s.deleted_ids.size) for s in self.slots.values())


def _chunk(name: str, dim: int, ids: np.ndarray, values: torch.Tensor, state: dict[str, torch.Tensor] | None,
           deleted: np.ndarray, fv: int, tv: int, fp16: bool) -> bytes:
    flags = (_FLAG_FP16 if fp16 else 0) | (_FLAG_STATE if state else 0)
    name_b = name.encode("utf-8")
    parts = [_HEADER.pack(MAGIC, FORMAT_VERSION, flags, fv, tv, dim, ids.size, deleted.size, len(name_b)), name_b]
    state = state or {}
    if flags & _FLAG_STATE:
        parts.append(struct.pack("<H", len(state)))
        for k, t in state.items():
            kb = k.encode("utf-8")
            parts.append(struct.pack("<HB", len(kb), 0 if t.dim() == 1 else 1) + kb)
    parts.append(np.ascontiguousarray(ids, dtype="<i8").tobytes())
    vdt = np.float16 if fp16 else np.float32
    parts.append(values.detach().cpu().numpy().astype(vdt).reshape(-1).tobytes())
    for t in state.values():  # optimizer state stays fp32: it is small and precision-sensitive
        parts.append(t.detach().cpu().numpy().astype("<f4").reshape(-1).tobytes())
    parts.append(np.ascontiguousarray(deleted, dtype="<i8").tobytes())
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def encode_delta(delta: TableDelta, fp16: bool = False, max_bytes: int = 1 << 20) -> list[bytes]:
    """Encode a delta as chunks of at most ~``max_bytes`` each (at least one row per chunk)."""
    chunks: list[bytes] = []
    for name, sd in delta.slots.items():
        dim = int(sd.values.shape[1]) if sd.values.dim() == 2 else 0
        per_row = 8 + dim * (2 if fp16 else 4) + sum(
            4 * (t[0].numel() if t.dim() > 1 else 1) for t in (sd.state or {}).values())
        rows_per = max(1, (max_bytes - 256) // max(per_row, 1))
        n = int(sd.ids.size)
        # Deletions go in the first chunk of the slot (8 bytes each, split when huge).
        del_per = max(1, (max_bytes - 256) // 8)
        starts = list(range(0, max(n, 1), rows_per))
        dels = [sd.deleted_ids[i:i + del_per] for i in range(0, max(sd.deleted_ids.size, 1), del_per)]
        for j in range(max(len(starts), len(dels))):
            s = starts[j] if j < len(starts) else n
            e = min(s + rows_per, n)
            d = dels[j] if j < len(dels) else np.zeros(0, np.int64)
            state = {k: t[s:e] for k, t in sd.state.items()} if sd.state else None
            chunks.append(_chunk(name, dim, sd.ids[s:e], sd.values[s:e], state, d,
                                 delta.from_version, delta.to_version, fp16))
    return chunks


def decode_delta(data: bytes) -> TableDelta:
    """Decode one chunk produced by :func:`encode_delta` into a one-slot :class:`TableDelta`."""
    mv = memoryview(data)
    if len(mv) < _HEADER.size + 4:
        raise DeltaFormatError(f"delta chunk too short ({len(mv)} bytes)")
    (crc,) = struct.unpack_from("<I", mv, len(mv) - 4)
    if zlib.crc32(mv[:-4]) != crc:
        raise DeltaFormatError("delta chunk checksum mismatch (corrupted or truncated)")
    magic, ver, flags, fv, tv, dim, n, nd, name_len = _HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise DeltaFormatError(f"not a delta chunk (magic {magic!r})")
    if ver != FORMAT_VERSION:
        raise DeltaFormatError(f"unsupported delta format version {ver}")
    off = _HEADER.size
    try:
        name = bytes(mv[off:off + name_len]).decode("utf-8")
        off += name_len
        state_meta: list[tuple[str, int]] = []
        if flags & _FLAG_STATE:
            (ns,) = struct.unpack_from("<H", mv, off)
            off += 2
            for _ in range(ns):  # a handful of optimizer state names, not per id
                kl, kind = struct.unpack_from("<HB", mv, off)
                off += 3
                state_meta.append((bytes(mv[off:off + kl]).decode("utf-8"), kind))
                off += kl
        vsize = 2 if flags & _FLAG_FP16 else 4
        expect = off + 8 * n + vsize * n * dim + sum(4 * n * (dim if k else 1) for _, k in state_meta) + 8 * nd + 4
        if expect != len(mv):
            raise DeltaFormatError(f"delta chunk size {len(mv)} != expected {expect}")
        ids = np.frombuffer(mv, dtype="<i8", count=n, offset=off).astype(np.int64)
        off += 8 * n
        vdt = "<f2" if flags & _FLAG_FP16 else "<f4"
        values = np.frombuffer(mv, dtype=vdt, count=n * dim, offset=off).astype(np.float32).reshape(n, dim)
        off += vsize * n * dim
        state = None
        if state_meta:
            state = {}
            for k, kind in state_meta:
                cnt = n * (dim if kind else 1)
                arr = np.frombuffer(mv, dtype="<f4", count=cnt, offset=off).astype(np.float32)
                state[k] = torch.from_numpy(arr.reshape(n, dim) if kind else arr)
                off += 4 * cnt
        deleted = np.frombuffer(mv, dtype="<i8", count=nd, offset=off).astype(np.int64)
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, DeltaFormatError):
            raise
        raise DeltaFormatError(f"malformed delta chunk: {exc}") from exc
    return TableDelta(fv, tv, {name: SlotDelta(ids, torch.from_numpy(values), deleted, state)})

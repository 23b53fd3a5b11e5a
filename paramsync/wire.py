"""The ``hw.params`` wire format: how the trainer ships parameters to serving replicas.

Every message is one msgpack map (never pickle) carrying ``"w"`` = :data:`WIRE_VERSION` and a
binary ``payload`` whose meaning depends on the kind:

- ``sparse``: rows of one slot that changed in table versions ``(from_version, version]``. The
  ``payload`` is one chunk of ``embedding_store``'s compact delta encoding (``encode_delta``:
  ids, f32 or f16 values, deleted ids, CRC), so a replica applies it with
  ``table.import_delta(msg.table_delta())``. Large deltas are split into chunks
  (``chunk_index`` / ``chunk_count`` under one ``publish_id``); each chunk stands on its own.
- ``dense``: the dense tower as safetensors bytes (``payload``), chunked the same way; a replica
  concatenates the chunks of one ``publish_id`` in ``chunk_index`` order.
- ``snapshot_begin`` / ``snapshot_end``: bracket a full snapshot ``snapshot_id``: every row of every
  slot (``sparse`` messages whose ``snapshot_id`` is set, ``from_version`` = 0) and the dense tower.
  A snapshot is authoritative: a replica that loads it replaces its whole state with it.
- ``control``: an operator's command to every replica that reads the partition, written by a
  serving process's admin endpoint (``headwater params pin|rollback|unpin``, see
  :mod:`serving.params_admin`); ``payload`` is a :class:`ControlCommand`. It changes no
  parameter: its ``version`` is the pinned version (-1 for unpin), its ``watermark_ms`` -1, and
  it carries the partition's current ``snapshot_offset`` so bootstrapping keeps working when it
  is the last message.

Every message carries ``model_id``, ``version`` (the table version the replica is at once it has
applied the message), ``watermark_ms`` (event time of the newest example the parameters include,
so serving can report freshness) and ``snapshot_offset``: the partition offset of the
``snapshot_begin`` marker of the newest *complete* snapshot (-1 before the first).

Bootstrapping a new replica without replaying the topic (all messages go to partition 0):
read the one message at ``end_offset - 1``, seek to its ``snapshot_offset``, load the snapshot up
to its ``snapshot_end`` (same ``snapshot_id``; its ``chunk_count`` is the number of messages of the
snapshot, markers included, so completeness can be checked), then apply every later message in
order. :func:`paramsync.bootstrap_offset`, :class:`paramsync.ParamsFollower` and
:class:`paramsync.ReplicaState` do exactly this.

Sharded topics (wire version 2, the trainer's ``num_param_shards`` = N > 1): ``hw.params`` has N + 1
partitions. Partition ``i < N`` carries only the rows whose ids :func:`embedding_store.sharding.shard_of`
places in shard ``i`` (a parameter-server shard reads just that partition); partition N, the
*control* partition, carries no rows, only the dense tower (recommender replicas read it). Every
partition is self-contained for bootstrapping: each gets its own snapshot markers (so
``snapshot_offset`` is an offset *in that partition*) and the snapshot's dense tower (it names the
slots and dim the table is built with); live dense publishes go to the control partition only.
Version-2 messages add ``shard`` (the partition's shard, -1 on the control partition) and
``num_shards``, so a reader can refuse a partition it was not configured for. Unsharded topics
(N = 1: one partition, everything on it) are still written as version 1, byte for byte as before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import msgpack

__all__ = ["WIRE_VERSION", "SPARSE", "DENSE", "SNAPSHOT_BEGIN", "SNAPSHOT_END", "CONTROL", "KINDS",
           "HEADER_BYTES", "ParamsWireError", "ParamsMessage", "ControlCommand", "encode_params",
           "decode_params", "payload_chunks", "join_payload", "CONTROL_SHARD", "params_partitions",
           "control_partition"]

WIRE_VERSION = 2  # 2 added shard / num_shards; 1 is still written for unsharded topics and read
READABLE_VERSIONS = (1, 2)
CONTROL_SHARD = -1  # the ``shard`` of messages on a sharded topic's control (dense) partition
SPARSE, DENSE, SNAPSHOT_BEGIN, SNAPSHOT_END = "sparse", "dense", "snapshot_begin", "snapshot_end"
CONTROL = "control"
KINDS = (SPARSE, DENSE, SNAPSHOT_BEGIN, SNAPSHOT_END, CONTROL)
HEADER_BYTES = 512  # generous bound on the envelope around a payload, for chunk sizing


class ParamsWireError(ValueError):
    """A ``hw.params`` message is malformed, truncated or of an unknown wire version."""


@dataclass
class ParamsMessage:
    """One ``hw.params`` message (see the module docstring for field meanings)."""

    kind: str
    model_id: str
    version: int
    watermark_ms: int = -1
    publish_id: int = 0
    chunk_index: int = 0
    chunk_count: int = 1
    slot: str = ""
    from_version: int = 0
    snapshot_id: int = -1
    snapshot_offset: int = -1
    rows: int = 0  # sparse: rows of the slot in this whole publish (informational)
    payload: bytes = b""
    created_ms: int = 0
    shard: int = 0  # the shard whose partition this is (CONTROL_SHARD on the control partition)
    num_shards: int = 1

    @property
    def in_snapshot(self) -> bool:
        return self.snapshot_id >= 0

    def table_delta(self) -> Any:
        """The ``embedding_store.TableDelta`` a sparse message carries (checksum verified)."""
        if self.kind != SPARSE:
            raise ParamsWireError(f"a {self.kind} message carries no table delta")
        from embedding_store import DeltaFormatError, decode_delta

        try:
            return decode_delta(self.payload)
        except DeltaFormatError as exc:
            raise ParamsWireError(f"bad sparse payload: {exc}") from None


@dataclass(frozen=True)
class ControlCommand:
    """The payload of a ``control`` message: ``pin`` serving to ``version``, or ``unpin`` (follow
    the newest again); ``command_id`` lets the issuer see when a replica has acted on it."""

    action: str
    version: int = -1
    command_id: int = 0

    ACTIONS = ("pin", "unpin")

    def encode(self) -> bytes:
        return msgpack.packb({"a": self.action, "v": int(self.version), "id": int(self.command_id)})

    @classmethod
    def decode(cls, payload: bytes) -> "ControlCommand":
        """Raises :class:`ParamsWireError` on anything but a well-formed command."""
        try:
            obj = msgpack.unpackb(payload, raw=False)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise ParamsWireError(f"undecodable control payload: {exc}") from None
        if not isinstance(obj, dict) or obj.get("a") not in cls.ACTIONS:
            raise ParamsWireError(f"control payload is not a command: {obj!r:.80}")
        version, cid = obj.get("v"), obj.get("id")
        if not isinstance(version, int) or not isinstance(cid, int) or isinstance(version, bool):
            raise ParamsWireError("control command has no integer version / id")
        return cls(obj["a"], version, cid)


def encode_params(msg: ParamsMessage) -> bytes:
    """msgpack bytes of ``msg``."""
    if msg.kind not in KINDS:
        raise ParamsWireError(f"unknown kind {msg.kind!r}")
    obj: dict[str, Any] = {
        "w": 1, "k": msg.kind, "m": msg.model_id, "ver": int(msg.version),
        "wm": int(msg.watermark_ms), "pid": int(msg.publish_id), "ci": int(msg.chunk_index),
        "cc": int(msg.chunk_count), "s": msg.slot, "fv": int(msg.from_version),
        "sid": int(msg.snapshot_id), "soff": int(msg.snapshot_offset), "n": int(msg.rows),
        "p": bytes(msg.payload), "t": int(msg.created_ms or time.time() * 1000),
    }
    if msg.num_shards != 1 or msg.shard != 0:
        obj.update(w=2, sh=int(msg.shard), ns=int(msg.num_shards))
    return msgpack.packb(obj, use_bin_type=True)


def _get(obj: dict, key: str, typ: type | tuple[type, ...], name: str) -> Any:
    v = obj.get(key)
    if not isinstance(v, typ) or isinstance(v, bool):
        raise ParamsWireError(f"field {name} missing or of wrong type ({type(v).__name__})")
    return v


def decode_params(data: bytes) -> ParamsMessage:
    """Inverse of :func:`encode_params`; anything malformed raises :class:`ParamsWireError`."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ParamsWireError(f"undecodable params message: {exc}") from None
    if not isinstance(obj, dict):
        raise ParamsWireError("params message is not a map")
    wire = obj.get("w")
    if wire not in READABLE_VERSIONS or isinstance(wire, bool):
        raise ParamsWireError(f"unsupported params wire version {wire!r} (want one of {READABLE_VERSIONS})")
    kind = _get(obj, "k", str, "kind")
    if kind not in KINDS:
        raise ParamsWireError(f"unknown kind {kind!r}")
    ci, cc = _get(obj, "ci", int, "chunk_index"), _get(obj, "cc", int, "chunk_count")
    if cc < 1 or not 0 <= ci < cc:
        raise ParamsWireError(f"chunk {ci} of {cc} is out of range")
    shard, num_shards = 0, 1
    if wire >= 2:
        shard, num_shards = _get(obj, "sh", int, "shard"), _get(obj, "ns", int, "num_shards")
        if num_shards < 1 or not CONTROL_SHARD <= shard < num_shards:
            raise ParamsWireError(f"shard {shard} of {num_shards} is out of range")
    return ParamsMessage(
        kind=kind, model_id=_get(obj, "m", str, "model_id"), version=_get(obj, "ver", int, "version"),
        watermark_ms=_get(obj, "wm", int, "watermark_ms"), publish_id=_get(obj, "pid", int, "publish_id"),
        chunk_index=ci, chunk_count=cc, slot=_get(obj, "s", str, "slot"),
        from_version=_get(obj, "fv", int, "from_version"), snapshot_id=_get(obj, "sid", int, "snapshot_id"),
        snapshot_offset=_get(obj, "soff", int, "snapshot_offset"), rows=_get(obj, "n", int, "rows"),
        payload=_get(obj, "p", bytes, "payload"), created_ms=_get(obj, "t", int, "created_ms"),
        shard=shard, num_shards=num_shards)


def params_partitions(num_shards: int) -> int:
    """Partitions ``hw.params`` needs for ``num_shards`` PS shards: 1 unsharded, else N + 1."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return 1 if num_shards == 1 else num_shards + 1


def control_partition(num_shards: int) -> int:
    """The partition carrying the dense tower (and, unsharded, everything): 0 or N."""
    return params_partitions(num_shards) - 1


def payload_chunks(base: ParamsMessage, payload: bytes, max_bytes: int = 1 << 20) -> list[ParamsMessage]:
    """Splits an opaque payload (dense safetensors bytes) into chunk messages."""
    size = max(max_bytes - HEADER_BYTES, 64)
    parts = [payload[i:i + size] for i in range(0, len(payload), size)] or [b""]
    return [replace(base, chunk_index=i, chunk_count=len(parts), payload=p)
            for i, p in enumerate(parts)]


def join_payload(chunks: list[ParamsMessage]) -> bytes:
    """Reassembles :func:`payload_chunks`; raises if chunks are missing, duplicated or mixed."""
    if not chunks:
        raise ParamsWireError("no chunks to join")
    pid, count = chunks[0].publish_id, chunks[0].chunk_count
    if any(c.publish_id != pid or c.chunk_count != count for c in chunks):
        raise ParamsWireError("chunks of different publishes")
    by_index = {c.chunk_index: c.payload for c in chunks}
    if sorted(by_index) != list(range(count)):
        raise ParamsWireError(f"have chunks {sorted(by_index)} of {count}")
    return b"".join(by_index[i] for i in range(count))

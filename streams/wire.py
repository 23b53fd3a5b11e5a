"""The wire envelope shared by every message: a msgpack map with a schema version and a type."""

from __future__ import annotations

import msgpack

SCHEMA_VERSION = 1


class SchemaError(ValueError):
    """A message is not valid for this schema (undecodable, wrong version, wrong shape)."""


def pack(obj: dict) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, **obj}, use_bin_type=True)


def unpack(data: bytes) -> dict:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise SchemaError(f"undecodable message: {exc}") from None
    if not isinstance(obj, dict):
        raise SchemaError("message is not a map")
    if obj.get("v") != SCHEMA_VERSION:
        raise SchemaError(f"unsupported schema version {obj.get('v')!r} (want {SCHEMA_VERSION})")
    return obj

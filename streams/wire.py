"""The wire envelope shared by every message: a msgpack map with a schema version and a type."""

from __future__ import annotations

import msgpack

SCHEMA_VERSION = 1


class SchemaError(ValueError):
    """A message is not valid for this schema (undecodable, wrong version, wrong shape)."""


def pack(obj: dict) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, **obj}, use_bin_type=True)


def unpack_map(data: bytes, error: type[Exception] | None = None, what: str = "message") -> dict:
    """A msgpack map from ``data``; anything else (garbage, another type) raises ``error``
    (default :class:`SchemaError`) with ``what`` in its message. Every wire format's first step."""
    error = error or SchemaError
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise error(f"undecodable {what}: {exc}") from None
    if not isinstance(obj, dict):
        raise error(f"{what} is not a map")
    return obj


def unpack(data: bytes) -> dict:
    obj = unpack_map(data)
    if obj.get("v") != SCHEMA_VERSION:
        raise SchemaError(f"unsupported schema version {obj.get('v')!r} (want {SCHEMA_VERSION})")
    return obj

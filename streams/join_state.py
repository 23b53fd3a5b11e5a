"""The joiner's pending state in RocksDB: impressions waiting for their window to close, actions.

Key layout (raw bytes; big-endian times so that key order is time order):

    i <close_ms:8> <request_id>              -> the impression message as received
    r <request_id>                           -> <close_ms:8>  (request is pending)
                                                <close_ms:8><hold_ms:8> (early emission: held)
    h <hold_ms:8> <request_id>               -> ""  (early emission: negatives not yet sent)
    a <len:2> <request_id> <item:8> <kind>   -> msgpack [value, event_time_ms, user_id]
    o <expire_ms:8> <a-key>                  -> ""  (an action whose impression is not here yet)
    m watermark | m max_time                 -> <ms:8>
    m <name>                                 -> msgpack (per-topic progress, watermarks)

Reads see only what was written; callers batch their puts and deletes in a :class:`WriteBatch`
and apply it at the points the commit protocol allows (see :mod:`streams.joiner`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import msgpack
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

_BE64 = struct.Struct(">Q")
_WATERMARK = b"mwatermark"
_MAX_TIME = b"mmax_time"


def action_key(request_id: bytes, item_id: int, kind: str) -> bytes:
    return (b"a" + len(request_id).to_bytes(2, "big") + request_id
            + _BE64.pack(item_id & 0xFFFFFFFFFFFFFFFF) + kind.encode())


def _action_prefix(request_id: bytes) -> bytes:
    return b"a" + len(request_id).to_bytes(2, "big") + request_id


@dataclass
class PendingAction:
    """An action stored for a pending request."""

    item_id: int
    kind: str
    value: float
    event_time_ms: int
    user_id: int = 0


class JoinState:
    """Pending impressions and actions on a RocksDB directory (survives kill -9 via its WAL)."""

    def __init__(self, path: str | Path, fsync: bool = False) -> None:
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        Path(path).mkdir(parents=True, exist_ok=True)
        self.db = Rdict(str(path), opts)
        wo = WriteOptions()
        wo.sync = fsync  # the WAL survives a process kill either way; sync also survives power loss
        self.db.set_write_options(wo)

    @staticmethod
    def batch() -> WriteBatch:
        return WriteBatch(raw_mode=True)

    def write(self, wb: WriteBatch) -> None:
        if not wb.is_empty():
            self.db.write(wb)

    # ---- reads
    def watermark(self) -> int:
        raw = self.db.get(_WATERMARK)
        return _BE64.unpack(raw)[0] if raw else 0

    def max_time(self) -> int:
        raw = self.db.get(_MAX_TIME)
        return _BE64.unpack(raw)[0] if raw else 0

    def pending_requests(self, request_ids: list[bytes]) -> list[bool]:
        if not request_ids:
            return []
        return [v is not None for v in self.db.get([b"r" + r for r in request_ids])]

    def due_impressions(self, watermark: int, limit: int) -> list[tuple[bytes, bytes]]:
        """(i-key, message) of requests whose window closed (close_ms <= watermark), oldest first."""
        out = []
        upper = b"i" + _BE64.pack(watermark + 1)
        for key, value in self.db.items(from_key=b"i"):
            if key >= upper or len(out) >= limit:
                break
            out.append((key, value))
        return out

    def actions_of(self, request_ids: list[bytes]) -> list[list[tuple[bytes, PendingAction]]]:
        """Stored actions per request id, with their keys (for deletion)."""
        it = self.db.iter()
        out = []
        for rid in request_ids:
            prefix = _action_prefix(rid)
            found = []
            it.seek(prefix)
            while it.valid():
                key = it.key()
                if not key.startswith(prefix):
                    break
                value, t, user = msgpack.unpackb(it.value())
                item = _BE64.unpack_from(key, len(prefix))[0]
                if item >= 1 << 63:
                    item -= 1 << 64
                found.append((key, PendingAction(item, key[len(prefix) + 8:].decode(), value, t,
                                                   user)))
                it.next()
            out.append(found)
        del it
        return out

    def expired_orphans(self, watermark: int, limit: int) -> Iterator[tuple[bytes, bytes]]:
        """(o-key, a-key) of parked actions whose impression never came before ``watermark``."""
        upper = b"o" + _BE64.pack(watermark + 1)
        n = 0
        for key, _ in self.db.items(from_key=b"o"):
            if key >= upper or n >= limit:
                break
            n += 1
            yield key, key[9:]

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        return self.db.get(keys) if keys else []

    def count_pending(self) -> int:
        n = 0
        for key in self.db.keys(from_key=b"r"):
            if not key.startswith(b"r"):
                break
            n += 1
        return n

    def request_states(self, request_ids: list[bytes]) -> list[bytes | None]:
        """The r-value of each request (None: not pending); 16 bytes while its early hold runs."""
        return self.db.get([b"r" + r for r in request_ids]) if request_ids else []

    def due_holds(self, until_ms: int, limit: int) -> list[bytes]:
        """Request ids whose early hold ended (hold_ms <= ``until_ms``), oldest first."""
        out = []
        upper = b"h" + _BE64.pack(until_ms + 1)
        for key in self.db.keys(from_key=b"h"):
            if key >= upper or len(out) >= limit:
                break
            out.append(key[9:])
        return out

    # ---- writes (into a batch)
    @staticmethod
    def put_held(wb: WriteBatch, request_id: bytes, close_ms: int, hold_ms: int) -> None:
        """Marks a just-stored impression as held for early emission until ``hold_ms``."""
        wb.put(b"h" + _BE64.pack(hold_ms) + request_id, b"")
        wb.put(b"r" + request_id, _BE64.pack(close_ms) + _BE64.pack(hold_ms))

    @staticmethod
    def release(wb: WriteBatch, request_id: bytes, r_value: bytes) -> None:
        """Ends a request's hold (its negatives are out); it stays pending until window close."""
        if len(r_value) == 16:
            wb.delete(b"h" + r_value[8:] + request_id)
            wb.put(b"r" + request_id, r_value[:8])

    @staticmethod
    def impression_key(request_id: bytes, r_value: bytes) -> bytes:
        return b"i" + r_value[:8] + request_id

    @staticmethod
    def put_impression(wb: WriteBatch, request_id: bytes, close_ms: int, message: bytes) -> None:
        wb.put(b"i" + _BE64.pack(close_ms) + request_id, message)
        wb.put(b"r" + request_id, _BE64.pack(close_ms))

    @staticmethod
    def put_action(wb: WriteBatch, request_id: bytes, item_id: int, kind: str, value: float,
                   event_time_ms: int, user_id: int, orphan_expire_ms: int | None = None) -> None:
        key = action_key(request_id, item_id, kind)
        wb.put(key, msgpack.packb([value, event_time_ms, user_id]))
        if orphan_expire_ms is not None:
            wb.put(b"o" + _BE64.pack(orphan_expire_ms) + key, b"")

    @staticmethod
    def delete_request(wb: WriteBatch, i_key: bytes, action_keys: list[bytes]) -> None:
        wb.delete(i_key)
        wb.delete(b"r" + i_key[9:])
        for k in action_keys:
            wb.delete(k)

    @staticmethod
    def put_times(wb: WriteBatch, watermark: int, max_time: int) -> None:
        wb.put(_WATERMARK, _BE64.pack(watermark))
        wb.put(_MAX_TIME, _BE64.pack(max_time))

    def meta(self, name: str) -> object:
        """A small msgpack value kept beside the state (e.g. per-topic progress)."""
        raw = self.db.get(b"m" + name.encode())
        return msgpack.unpackb(raw, raw=False) if raw else None

    @staticmethod
    def put_meta(wb: WriteBatch, name: str, value: object) -> None:
        wb.put(b"m" + name.encode(), msgpack.packb(value))

    def close(self) -> None:
        self.db.close()

"""The joiner's pending state in RocksDB: impressions waiting for their window to close, actions.

Key layout (raw bytes; big-endian times so that key order is time order):

    i <close_ms:8> <request_id>              -> <partition:4><offset:8> the impression message
    r <request_id>                           -> <close_ms:8>  (request is pending)
                                                <close_ms:8><hold_ms:8> (early emission: held)
    h <hold_ms:8> <request_id>               -> ""  (early emission: negatives not yet sent)
    a <len:2> <request_id> <item:8> <kind>   -> msgpack [value, event_time_ms, user_id,
                                                         partition, offset]
    o <expire_ms:8> <a-key>                  -> ""  (an action whose impression is not here yet)

Each impression and action remembers the input record it came from (partition, offset), so
the joiner knows which offsets a replay must still cover (:mod:`streams.join_positions`).
Reads see only what was written; callers batch their puts and deletes in a :class:`WriteBatch`
and apply it at the points the commit protocol allows (see :mod:`streams.joiner`). The state
lives as long as the joiner owns its partitions: :meth:`JoinState.clear` empties it when they
move, and the input is read again.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import msgpack
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

_BE64 = struct.Struct(">Q")
_SOURCE = struct.Struct(">IQ")  # (partition, offset) of the input record
Source = tuple[int, int]


def action_key(request_id: bytes, item_id: int, kind: str) -> bytes:
    return (b"a" + len(request_id).to_bytes(2, "big") + request_id
            + _BE64.pack(item_id & 0xFFFFFFFFFFFFFFFF) + kind.encode())


def request_id_of(akey: bytes) -> str:
    """The request id inside an :func:`action_key`."""
    n = int.from_bytes(akey[1:3], "big")
    return akey[3:3 + n].decode()


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
    source: Source | None = None  # (partition, offset) of its record on the actions topic


class JoinState:
    """Pending impressions and actions on a RocksDB directory: disk instead of memory for long
    windows, not durability (the input is the changelog), so writes skip the WAL."""

    def __init__(self, path: str | Path) -> None:
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        Path(path).mkdir(parents=True, exist_ok=True)
        self._path, self._opts = str(path), opts
        self.db = Rdict(self._path, opts)
        self._wo = WriteOptions()
        self._wo.disable_wal = True
        self.db.set_write_options(self._wo)

    @staticmethod
    def batch() -> WriteBatch:
        return WriteBatch(raw_mode=True)

    def write(self, wb: WriteBatch) -> None:
        if not wb.is_empty():
            self.db.write(wb)

    # ---- reads
    def pending_requests(self, request_ids: list[bytes]) -> list[bool]:
        if not request_ids:
            return []
        return [v is not None for v in self.db.get([b"r" + r for r in request_ids])]

    def due_impressions(self, watermark: int, limit: int) -> list[tuple[bytes, bytes, Source]]:
        """(i-key, message, source) of requests whose window closed (close_ms <= watermark),
        oldest first."""
        out = []
        upper = b"i" + _BE64.pack(watermark + 1)
        for key, value in self.db.items(from_key=b"i"):
            if key >= upper or len(out) >= limit:
                break
            out.append((key, *split_impression(value)))
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
                found.append((key, parse_action(key, it.value())))
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

    def parked_sources(self, limit: int) -> dict[int, list[tuple[int, int]]] | None:
        """``{partition: [(offset, expire_ms)]}`` of the actions parked until their impression
        comes (what the join hand-off lists as unresolved); None past ``limit`` of them."""
        okeys = []
        for key in self.db.keys(from_key=b"o"):
            if not key.startswith(b"o"):
                break
            if len(okeys) >= limit:
                return None
            okeys.append(key)
        akeys = [k[9:] for k in okeys]
        # An action whose impression came meanwhile waits beside its request (its o-key stays
        # until it expires); one whose request closed is gone (value None): neither is parked.
        claimed = self.pending_requests([request_id_of(k).encode() for k in akeys])
        out: dict[int, list[tuple[int, int]]] = {}
        for okey, akey, value, is_claimed in zip(okeys, akeys, self.get_many(akeys), claimed):
            source = None if value is None or is_claimed else parse_action(akey, value).source
            if source is not None:
                out.setdefault(source[0], []).append((source[1], _BE64.unpack(okey[1:9])[0]))
        return out

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
    def put_impression(wb: WriteBatch, request_id: bytes, close_ms: int, message: bytes,
                       source: Source) -> bytes:
        """Stores a pending request; returns its i-key."""
        key = b"i" + _BE64.pack(close_ms) + request_id
        wb.put(key, _SOURCE.pack(*source) + message)
        wb.put(b"r" + request_id, _BE64.pack(close_ms))
        return key

    @staticmethod
    def put_action(wb: WriteBatch, key: bytes, pa: PendingAction,
                   orphan_expire_ms: int | None = None) -> None:
        """Stores an action under its :func:`action_key` (with ``pa.source``)."""
        source = pa.source or (0, -1)
        wb.put(key, msgpack.packb([pa.value, pa.event_time_ms, pa.user_id, *source]))
        if orphan_expire_ms is not None:
            wb.put(b"o" + _BE64.pack(orphan_expire_ms) + key, b"")

    @staticmethod
    def delete_request(wb: WriteBatch, i_key: bytes, action_keys: list[bytes]) -> None:
        wb.delete(i_key)
        wb.delete(b"r" + i_key[9:])
        for k in action_keys:
            wb.delete(k)

    def clear(self) -> None:
        """Drops everything (the partitions moved: their state is rebuilt from the input)."""
        self.db.close()
        Rdict.destroy(self._path, self._opts)
        self.db = Rdict(self._path, self._opts)
        self.db.set_write_options(self._wo)

    def close(self) -> None:
        self.db.close()


def split_impression(value: bytes) -> tuple[bytes, Source]:
    """An i-value -> (the impression message, the source it was read from)."""
    return value[_SOURCE.size:], _SOURCE.unpack_from(value)


def parse_action(key: bytes, value: bytes) -> PendingAction:
    """An a-key and its value -> the stored action."""
    n = int.from_bytes(key[1:3], "big")
    item = int.from_bytes(key[3 + n:11 + n], "big", signed=True)
    fields = msgpack.unpackb(value)
    source = (fields[3], fields[4]) if len(fields) >= 5 and fields[4] >= 0 else None
    return PendingAction(item, key[11 + n:].decode(), fields[0], fields[1], fields[2], source)

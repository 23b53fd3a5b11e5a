"""The hw.params envelope: round trips, chunking under a size limit, clear errors on bad bytes."""

import msgpack
import numpy as np
import pytest
import torch

from embedding_store import SlotDelta, TableDelta, encode_delta
from paramsync import (DENSE, SNAPSHOT_END, SPARSE, ParamsMessage, ParamsWireError,
                       decode_params, encode_params, join_payload, payload_chunks)


def test_envelope_round_trips_every_header_field():
    msg = ParamsMessage(kind=SNAPSHOT_END, model_id="m1", version=42, watermark_ms=1700000000123,
                        publish_id=9, chunk_index=0, chunk_count=7, slot="", from_version=40,
                        snapshot_id=9, snapshot_offset=1234, rows=0, payload=b"", created_ms=5)
    assert decode_params(encode_params(msg)) == msg


def test_sparse_payload_is_the_embedding_store_delta_and_decodes_back():
    ids = np.array([5, -3, 2**62], np.int64)
    vals = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    delta = TableDelta(40, 42, {"user_id": SlotDelta(ids, vals, np.array([7], np.int64))})
    (chunk,) = encode_delta(delta)
    msg = ParamsMessage(kind=SPARSE, model_id="m1", version=42, slot="user_id", from_version=40,
                        rows=3, payload=chunk)
    back = decode_params(encode_params(msg)).table_delta()
    sd = back.slots["user_id"]
    np.testing.assert_array_equal(sd.ids, ids)
    assert torch.equal(sd.values, vals)
    np.testing.assert_array_equal(sd.deleted_ids, [7])


def test_a_corrupted_sparse_payload_is_a_wire_error():
    delta = TableDelta(0, 1, {"s": SlotDelta(np.arange(3), torch.ones(3, 2))})
    chunk = bytearray(encode_delta(delta)[0])
    chunk[30] ^= 0xFF
    msg = decode_params(encode_params(ParamsMessage(kind=SPARSE, model_id="m", version=1,
                                                    payload=bytes(chunk))))
    with pytest.raises(ParamsWireError, match="bad sparse payload"):
        msg.table_delta()


def test_dense_payload_chunks_stay_under_the_limit_and_reassemble():
    payload = bytes(range(256)) * 1000
    chunks = payload_chunks(ParamsMessage(kind=DENSE, model_id="m", version=1), payload, 10_000)
    encoded = [encode_params(c) for c in chunks]
    assert len(chunks) > 20 and max(len(e) for e in encoded) <= 10_000
    back = [decode_params(e) for e in encoded]
    assert join_payload(back[::-1]) == payload
    with pytest.raises(ParamsWireError, match="have chunks"):
        join_payload(back[1:])


@pytest.mark.parametrize("data", [b"", b"\xc1garbage", msgpack.packb([1, 2]),
                                  msgpack.packb({"w": 99, "k": "sparse"}),
                                  msgpack.packb({"w": 1, "k": "weights"})])
def test_malformed_messages_raise_a_wire_error(data):
    with pytest.raises(ParamsWireError):
        decode_params(data)


def test_a_chunk_index_outside_its_count_is_rejected():
    obj = msgpack.unpackb(encode_params(ParamsMessage(kind=DENSE, model_id="m", version=1)), raw=False)
    obj["ci"] = 3
    with pytest.raises(ParamsWireError, match="out of range"):
        decode_params(msgpack.packb(obj, use_bin_type=True))

"""The hw.params envelope: round trips, chunking under a size limit, clear errors on bad bytes."""

import msgpack
import numpy as np
import pytest

from training.params_wire import (DENSE, SPARSE, ParamsMessage, ParamsWireError, decode_params,
                                  encode_params, join_payload, payload_chunks, sparse_chunks)


def _base(**kw):
    return ParamsMessage(kind=SPARSE, model_id="m1", version=42, watermark_ms=1700000000123,
                         publish_id=9, slot="user_id", from_version=40, **kw)


def test_sparse_message_round_trips_ids_values_and_header():
    ids = np.array([5, -3, 2**62], np.int64)
    vals = np.arange(12, dtype=np.float32).reshape(3, 4)
    (msg,) = sparse_chunks(_base(), ids, vals, deleted_ids=np.array([7], np.int64))
    back = decode_params(encode_params(msg))
    assert (back.kind, back.model_id, back.version, back.from_version, back.slot) == \
        (SPARSE, "m1", 42, 40, "user_id")
    assert back.watermark_ms == 1700000000123 and back.dim == 4
    np.testing.assert_array_equal(back.ids, ids)
    np.testing.assert_array_equal(back.values, vals)
    np.testing.assert_array_equal(back.deleted_ids, [7])


def test_fp16_values_halve_the_payload_and_stay_close():
    ids = np.arange(1000, dtype=np.int64)
    vals = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
    f32 = encode_params(sparse_chunks(_base(), ids, vals)[0])
    f16_msg = sparse_chunks(_base(dtype="f16"), ids, vals)[0]
    f16 = encode_params(f16_msg)
    assert len(f16) < 0.6 * len(f32)
    back = decode_params(f16)
    assert np.abs(back.values_f32() - vals).max() < 1e-2


def test_large_deltas_are_chunked_under_the_limit_and_lose_no_row():
    ids = np.arange(50_000, dtype=np.int64)
    vals = np.ones((50_000, 16), np.float32)
    deleted = np.arange(100_000, 130_000, dtype=np.int64)
    chunks = sparse_chunks(_base(), ids, vals, deleted, max_bytes=64 * 1024)
    encoded = [encode_params(c) for c in chunks]
    assert len(chunks) > 10 and max(len(e) for e in encoded) <= 64 * 1024
    back = [decode_params(e) for e in encoded]
    assert [b.chunk_index for b in back] == list(range(len(back)))
    assert all(b.chunk_count == len(back) for b in back)
    np.testing.assert_array_equal(np.concatenate([b.ids for b in back]), ids)
    np.testing.assert_array_equal(np.concatenate([b.deleted_ids for b in back]), deleted)


def test_an_empty_delta_is_still_one_message():
    chunks = sparse_chunks(_base(), np.zeros(0, np.int64), np.zeros((0, 8), np.float32))
    assert len(chunks) == 1 and decode_params(encode_params(chunks[0])).version == 42


def test_dense_payload_chunks_reassemble_and_missing_chunks_are_detected():
    payload = bytes(range(256)) * 1000
    chunks = payload_chunks(ParamsMessage(kind=DENSE, model_id="m", version=1), payload, 10_000)
    back = [decode_params(encode_params(c)) for c in chunks]
    assert join_payload(back[::-1]) == payload
    with pytest.raises(ParamsWireError, match="have chunks"):
        join_payload(back[1:])


@pytest.mark.parametrize("data", [b"", b"\xc1garbage", msgpack.packb([1, 2]),
                                  msgpack.packb({"w": 99, "k": "sparse"})])
def test_malformed_messages_raise_a_wire_error(data):
    with pytest.raises(ParamsWireError):
        decode_params(data)


def test_truncated_value_buffers_are_rejected():
    msg = sparse_chunks(_base(), np.arange(4, dtype=np.int64), np.ones((4, 2), np.float32))[0]
    obj = msgpack.unpackb(encode_params(msg), raw=False)
    obj["val"] = obj["val"][:-4]
    with pytest.raises(ParamsWireError, match="values hold"):
        decode_params(msgpack.packb(obj, use_bin_type=True))

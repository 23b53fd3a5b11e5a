"""The event schema: round trips, versioning, validation and the columnar batch operations."""

import math

import msgpack
import numpy as np
import pytest

from streams.events import (SCHEMA_VERSION, Action, ExampleBatch, Impression, Ragged, SchemaError,
                            Watermark, decode_event, decode_examples, encode_actions,
                            encode_event, encode_examples, event_from_json, example_ids,
                            keep_negative)


def make_batch(n: int, seed: int = 0, dense_dim: int = 2) -> ExampleBatch:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 4, n).astype(np.int32)
    return ExampleBatch(
        example_id=rng.integers(-2**62, 2**62, n), user_id=rng.integers(0, 100, n),
        item_id=rng.integers(0, 1000, n), label=rng.integers(0, 2, n).astype(np.float32),
        sample_rate=np.full(n, 0.5, np.float32), event_time_ms=rng.integers(0, 10**12, n),
        sparse={"user_id": Ragged(rng.integers(0, 100, n), np.ones(n, np.int32)),
                "tags": Ragged(rng.integers(0, 50, int(lengths.sum())), lengths)},
        dense=rng.random((n, dense_dim), dtype=np.float32),
        truth_p=np.where(rng.random(n) < 0.5, np.nan, rng.random(n)).astype(np.float32))


def assert_batches_equal(a: ExampleBatch, b: ExampleBatch) -> None:
    for name, _ in ExampleBatch._COLUMNS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.sparse.keys() == b.sparse.keys()
    for s in a.sparse:
        np.testing.assert_array_equal(a.sparse[s].values, b.sparse[s].values)
        np.testing.assert_array_equal(a.sparse[s].lengths, b.sparse[s].lengths)
    np.testing.assert_array_equal(a.dense, b.dense)


def test_example_batch_round_trips_through_the_wire():
    batch = make_batch(50)
    back = decode_examples(encode_examples(batch))
    assert_batches_equal(batch, back)
    assert back.example_id.dtype == np.int64 and back.label.dtype == np.float32
    assert back.sparse["tags"].lengths.dtype == np.int32
    back.label[0] = 7.0  # decoded arrays are writable (torch.from_numpy needs that)


def test_empty_example_batch_round_trips():
    assert len(decode_examples(encode_examples(ExampleBatch.empty()))) == 0


def test_take_selects_rows_with_their_ragged_features():
    batch = make_batch(20)
    idx = np.array([5, 0, 19, 5])
    sub = batch.take(idx)
    off = batch.sparse["tags"].offsets
    want = np.concatenate([batch.sparse["tags"].values[off[i]:off[i + 1]] for i in idx])
    np.testing.assert_array_equal(sub.sparse["tags"].values, want)
    np.testing.assert_array_equal(sub.item_id, batch.item_id[idx])
    assert len(batch.take(batch.label > 0)) == int((batch.label > 0).sum())


def test_concat_fills_slots_missing_from_some_batches_with_empty_lists():
    a, b = make_batch(3), make_batch(4, seed=1)
    del b.sparse["tags"]
    both = ExampleBatch.concat([a, b])
    assert len(both) == 7
    np.testing.assert_array_equal(both.sparse["tags"].lengths[3:], 0)
    np.testing.assert_array_equal(both.sparse["tags"].values, a.sparse["tags"].values)
    assert_batches_equal(both.take(np.arange(3)), a)


def test_concat_rejects_mismatched_dense_widths():
    with pytest.raises(SchemaError):
        ExampleBatch.concat([make_batch(2, dense_dim=2), make_batch(2, dense_dim=3)])


@pytest.mark.parametrize("garbage", [b"", b"\xc1\xc1", msgpack.packb([1, 2]),
                                     msgpack.packb({"v": SCHEMA_VERSION + 1, "t": "ex"})])
def test_decode_examples_rejects_garbage_with_schema_error(garbage):
    with pytest.raises(SchemaError):
        decode_examples(garbage)


def test_decode_examples_rejects_inconsistent_ragged_lengths():
    obj = msgpack.unpackb(encode_examples(make_batch(5)), raw=False)
    obj["sparse"]["tags"][1] = np.full(5, 9, "<i4").tobytes()
    with pytest.raises(SchemaError, match="lengths"):
        decode_examples(msgpack.packb(obj, use_bin_type=True))


def test_events_round_trip_and_carry_the_schema_version():
    imp = Impression("r1", 7, 1000, [1, 2], item_sparse={"cat": [[3], [4, 5]]},
                     user_sparse={"city": [9]}, dense=[[0.5], [1.5]], truth_p=[0.1, 0.9])
    acts = [Action("r1", 7, 2, "click", 1.0, 1500), Action("r1", 7, 1, "buy", 9.5, 1600)]
    for event in (imp, acts, Watermark(123)):
        data = encode_event(event)
        assert msgpack.unpackb(data)["v"] == SCHEMA_VERSION
        assert decode_event(data) == event


@pytest.mark.parametrize("bad, reason", [
    (Impression("", 1, 0, [1]), "request_id"),
    (Impression("r", 1, 0, []), "no items"),
    (Impression("r", 1, 0, [1, 2], item_sparse={"cat": [[1]]}), "one id list per item"),
    (Impression("r", 1, 0, [1], dense=[[math.nan]]), "finite"),
    (Impression("r", 1, 0, [1], dense=[["1.5"]]), "finite"),
    (Impression("r", 1, 0, [1.5]), "64-bit"),
    (Impression("r", 1, 0, [1], item_sparse={"c": [[2**63]]}), "64-bit"),
    (Impression("r", 1, 0, [2**64]), "64-bit"),
    (Impression("r", 1, 0, [1], truth_p=[1.5]), r"\[0, 1\]"),
])
def test_invalid_impressions_are_rejected_with_the_field_named(bad, reason):
    with pytest.raises(SchemaError, match=reason):
        decode_event(encode_event(bad))


def test_invalid_action_is_rejected():
    with pytest.raises(SchemaError, match="item_id"):
        decode_event(encode_actions([Action("r", 1, "nope", "click", 1.0, 0)]))  # type: ignore[arg-type]


def test_json_events_are_accepted_at_the_cli():
    imp = event_from_json({"type": "impression", "request_id": "r", "user_id": 1,
                           "event_time_ms": 5, "items": [3, 4]})
    assert isinstance(imp, Impression) and imp.item_sparse == {}
    assert event_from_json({"type": "action", "request_id": "r", "user_id": 1, "item_id": 3,
                            "event_time_ms": 6}) == [Action("r", 1, 3, "click", 1.0, 6)]
    with pytest.raises(SchemaError):
        event_from_json({"type": "bogus"})


def test_example_ids_are_deterministic_and_distinct():
    a = example_ids("req-1", np.arange(1000))
    assert a.dtype == np.int64 and len(np.unique(a)) == 1000
    np.testing.assert_array_equal(a, example_ids("req-1", np.arange(1000)))
    assert not np.intersect1d(a, example_ids("req-2", np.arange(1000))).size


def test_negative_downsampling_keeps_the_requested_fraction_deterministically():
    ids = example_ids("r", np.arange(100_000))
    kept = keep_negative(ids, 0.25)
    assert abs(kept.mean() - 0.25) < 0.01
    np.testing.assert_array_equal(kept, keep_negative(ids, 0.25))
    assert keep_negative(ids, 1.0).all() and not keep_negative(ids, 0.0).any()


def test_a_dead_letter_whose_payload_is_a_number_is_refused_not_allocated():
    # bytes(2**31) would allocate 2 GiB of zeros from a 60-byte message (found by the fuzz run)
    from streams.events import decode_dead_letter

    forged = msgpack.packb({"v": SCHEMA_VERSION, "t": "dead", "reason": "x", "topic": "t",
                            "partition": 0, "offset": 1, "payload": 2**31})
    with pytest.raises(SchemaError, match="payload must be bytes"):
        decode_dead_letter(forged)

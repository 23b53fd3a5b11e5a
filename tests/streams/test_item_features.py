"""hw.items: the item-features wire format, its extraction from impressions, and the publisher."""

import math

import msgpack
import pytest

from streams.events import Impression
from streams.item_features import (ItemFeaturePublisher, ItemFeatures, decode_item_features,
                                   decode_item_message, encode_item_features, features_digest,
                                   item_features_from_impression, item_key)
from streams.kafka_consumer import read_topic
from streams.kafka_io import admin_client, topic_names
from streams.kafka_producer import BatchProducer
from streams.wire import SCHEMA_VERSION, SchemaError


def _imp(items=(7, 8), t=1000, dense=((0.1, 0.0, 2.5, 0.0), (0.2, 0.0, 0.0, 1.0))):
    return Impression("r1", 5, t, list(items),
                      item_sparse={"genres": [[1, 2], []], "category": [[30], [31]]},
                      user_sparse={"gender": [9]}, dense=None if dense is None else [list(r) for r in dense])


def test_item_features_round_trip_through_the_wire():
    f = ItemFeatures(-(2**63), {"genres": [1, -2, 2**63 - 1], "category": []}, [0.25, 1.0, -3.5e-8], 123)
    back = decode_item_features(encode_item_features(f))
    assert back == f and not back.tombstone


def test_a_tombstone_round_trips_and_a_null_value_with_an_item_key_is_one_too():
    dead = ItemFeatures.deleted(42, 99)
    back = decode_item_message(item_key(42), encode_item_features(dead))
    assert back.tombstone and back.item_id == 42 and back.event_time_ms == 99
    kafka_tombstone = decode_item_message(item_key(-5), None, timestamp_ms=7)
    assert kafka_tombstone.tombstone and kafka_tombstone.item_id == -5


def test_the_key_is_the_item_id_and_a_value_under_another_key_is_refused():
    assert item_key(1) == b"\x00" * 7 + b"\x01" and len(item_key(-1)) == 8
    value = encode_item_features(ItemFeatures(1, {}, [], 0))
    assert decode_item_message(item_key(1), value).item_id == 1
    with pytest.raises(SchemaError, match="does not name item 1"):
        decode_item_message(item_key(2), value)
    with pytest.raises(SchemaError, match="8-byte item key"):
        decode_item_message(b"\x01", None)


def _raw(**fields):
    msg = {"v": SCHEMA_VERSION, "t": "item", "item_id": 1, "event_time_ms": 0, "sparse": {}, "dense": []}
    msg.update(fields)
    return msgpack.packb(msg, use_bin_type=True)


@pytest.mark.parametrize("fields, error", [
    ({"v": 99}, "schema version"),
    ({"t": "imp"}, "not an item-features message"),
    ({"item_id": 2**63}, "item_id"),
    ({"item_id": "7"}, "item_id"),
    ({"event_time_ms": -1}, "event_time_ms"),
    ({"sparse": None}, "tombstone"),
    ({"dense": None}, "tombstone"),
    ({"sparse": [1, 2]}, "map of slot"),
    ({"sparse": {"": [1]}}, "slot names"),
    ({"sparse": {"g": [1.5]}}, "sparse\\['g'\\]"),
    ({"sparse": {"g": [True]}}, "sparse\\['g'\\]"),
    ({"sparse": {"g": [[1]]}}, "sparse\\['g'\\]"),
    ({"sparse": {"g": 3}}, "sparse\\['g'\\]"),
    ({"dense": [1.0, math.nan]}, "finite"),
    ({"dense": [1.0, "x"]}, "numbers"),
    ({"dense": 1.0}, "numbers"),
])
def test_malformed_messages_raise_schema_errors_naming_the_field(fields, error):
    with pytest.raises(SchemaError, match=error):
        decode_item_features(_raw(**fields))


def test_garbage_and_missing_fields_are_schema_errors():
    with pytest.raises(SchemaError):
        decode_item_features(b"\xc1not msgpack")
    obj = {"v": SCHEMA_VERSION, "t": "item", "item_id": 1, "event_time_ms": 0, "sparse": {}}
    with pytest.raises(SchemaError, match="lacks"):
        decode_item_features(msgpack.packb(obj))


def test_encoding_validates_so_a_bad_item_fails_at_the_producer():
    with pytest.raises(SchemaError):
        encode_item_features(ItemFeatures(1, {"g": [1]}, None, 0))


def test_features_from_an_impression_are_its_item_slots_and_the_dense_tail():
    out = item_features_from_impression(_imp(), ["genres", "missing_slot"], 2)
    assert [f.item_id for f in out] == [7, 8]
    assert out[0] == ItemFeatures(7, {"genres": [1, 2]}, [2.5, 0.0], 1000)
    assert out[1] == ItemFeatures(8, {"genres": []}, [0.0, 1.0], 1000)  # empty bag and missing value
    assert item_features_from_impression(_imp(), ["category"], 0)[1] == ItemFeatures(8, {"category": [31]}, [], 1000)


def test_an_impression_without_dense_rows_gives_the_joiners_zeros():
    (first, _) = item_features_from_impression(_imp(dense=None), ["genres"], 2)
    assert first.dense == [0.0, 0.0]


def test_an_item_shown_twice_keeps_its_last_row():
    imp = _imp(items=(7, 7))
    (only,) = item_features_from_impression(imp, ["genres"], 2)
    assert only.sparse == {"genres": []} and only.dense == [0.0, 1.0]


def test_a_dense_row_narrower_than_the_tail_is_an_error():
    with pytest.raises(ValueError, match="item tail"):
        item_features_from_impression(_imp(), ["genres"], 6)


def test_the_digest_sees_ids_slots_and_float32_values_but_not_the_time():
    f = ItemFeatures(1, {"a": [1, 2]}, [0.5], 10)
    assert features_digest(f) == features_digest(ItemFeatures(1, {"a": [1, 2]}, [0.5], 99))
    assert features_digest(f) == features_digest(ItemFeatures(1, {"a": [1, 2]}, [0.5 + 1e-12], 10))
    for other in (ItemFeatures(1, {"a": [2, 1]}, [0.5], 10), ItemFeatures(1, {"b": [1, 2]}, [0.5], 10),
                  ItemFeatures(1, {"a": [1, 2]}, [0.25], 10), ItemFeatures(1, {"a": [1], "b": [2]}, [0.5], 10),
                  ItemFeatures.deleted(1, 10)):
        assert features_digest(other) != features_digest(f)


def test_created_topic_set_includes_items(kafka_broker, kafka_topics):
    topics = topic_names(kafka_topics.topic_prefix)
    assert topics.items == f"{kafka_topics.topic_prefix}.items" and topics.items in topics.all()
    admin = admin_client(kafka_topics)
    try:
        assert topics.items in set(admin.list_topics())
    finally:
        admin.close()


def test_publisher_sends_an_item_only_when_its_features_changed(kafka_topics):
    topic = topic_names(kafka_topics.topic_prefix).items
    producer = BatchProducer(kafka_topics)
    pub = ItemFeaturePublisher(producer, topic, ["genres"], 2)
    assert pub.observe(_imp(t=1000)) == 2
    assert pub.observe(_imp(t=2000)) == 0  # same features, later: nothing to send
    changed = _imp(t=3000, dense=((0.1, 0.0, 2.5, 0.0), (0.2, 0.0, 4.0, 0.0)))
    assert pub.observe(changed) == 1  # item 8's year became known
    pub.delete(7, 4000)
    producer.flush()
    producer.close()
    records = read_topic(kafka_topics, topic, stop_after=4, idle_s=1.0)
    got = [decode_item_message(r.key, r.value) for r in records]
    assert [(f.item_id, f.event_time_ms, f.tombstone) for f in got] == [
        (7, 1000, False), (8, 1000, False), (8, 3000, False), (7, 4000, True)]
    assert got[2].dense == [4.0, 0.0] and all(r.key == item_key(f.item_id) for r, f in zip(records, got))
    assert pub.sent == 4 and pub.unchanged == 3  # both at 2000, item 7 at 3000


def test_publisher_memory_is_bounded_and_a_forgotten_item_is_sent_again(kafka_topics):
    topic = topic_names(kafka_topics.topic_prefix).items
    producer = BatchProducer(kafka_topics)
    pub = ItemFeaturePublisher(producer, topic, ["genres"], 0, max_items=2)
    for item in (1, 2, 1, 3):  # 1 was observed after 2, so 2 is the least recently observed
        pub.publish(ItemFeatures(item, {"genres": [item]}, [], 0))
    assert len(pub._digests) == 2 and set(pub._digests) == {1, 3}
    assert pub.publish(ItemFeatures(1, {"genres": [1]}, [], 0)) is False
    assert pub.publish(ItemFeatures(2, {"genres": [2]}, [], 0)) is True  # forgotten: sent again
    producer.flush()
    producer.close()
    records = read_topic(kafka_topics, topic, stop_after=4, idle_s=1.0)
    assert [r.key for r in records] == [item_key(i) for i in (1, 2, 3, 2)]

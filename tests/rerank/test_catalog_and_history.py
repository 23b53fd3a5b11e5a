"""What the rerank prompt reads: item texts (files, bounded) and the live user history (hw.actions)."""

from __future__ import annotations

import json
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serving.item_text import ItemTextConfig, ItemTexts
from serving.user_history import HistoryFollower, Interaction, UserHistory


def test_catalog_files_load_in_every_format_with_bad_rows_refused(tmp_path):
    from streams.log_schema import entity_ids

    rows = [{"movieId": "1", "title": "Toy Story (1995)", "genres": "Adventure|Animation"},
            {"movieId": "tt0114709", "title": "Heat", "genres": ""},
            {"movieId": "", "title": "no id", "genres": "Drama"},
            {"movieId": "4", "title": "", "genres": ""}]
    csv = tmp_path / "items.csv"
    csv.write_text("movieId,title,genres\n" + "".join(f'{r["movieId"]},{r["title"]},{r["genres"]}\n' for r in rows))
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    parquet = tmp_path / "items.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    cfg = ItemTextConfig(item_text_id_col="movieId", item_text_cols="title,genres")
    heat = int(entity_ids("movieId", ["tt0114709"])[0])  # the id the replay gives a string item
    for path, bad in ((csv, 2), (jsonl, 3), (parquet, 2)):
        texts = ItemTexts()
        rejected = texts.load(path, cfg)
        assert len(texts) == 2, path
        assert texts.get([1, heat, 4]) == ["Toy Story (1995) | Adventure|Animation", "Heat", None]
        assert len(rejected) == bad and {r.reason for r in rejected} >= {"empty movieId"}
        assert all(r.row > 0 for r in rejected)
    with pytest.raises(ValueError, match="no id column"):
        ItemTexts().load(csv, ItemTextConfig(item_text_id_col="item_id", item_text_cols="title"))


def test_item_texts_are_bounded_least_recently_used_first():
    texts = ItemTexts(max_items=3, max_chars=5)
    texts.update((i, f"text {i}") for i in range(3))
    texts.get([0])  # item 0 was used: 1 is now the oldest
    texts.put(3, "text 3")
    assert texts.get([0, 1, 2, 3]) == ["text ", None, "text ", "text "]
    assert texts.evicted == 1
    texts.put(2, None)  # a tombstone
    assert len(texts) == 2


def test_history_keeps_the_newest_per_user_bounded_and_expires_by_event_time():
    h = UserHistory(max_users=2, per_user=3, ttl_s=10.0)
    for k in range(5):
        h.add(1, 10 + k, "click", 1000 * k)
    items, first = h.recent(1)
    assert [it.item_id for it in items] == [12, 13, 14] and first == 2  # absolute positions kept
    h.add(2, 20, "buy", 4000)
    h.add(3, 30, "click", 4000)  # a third user: the least recently active (1) goes
    assert h.recent(1) == ([], 0) and len(h) == 2
    h.add(2, 21, "click", 14_500)  # stream time moves on: 4000 is now older than 10 s
    items, first = h.recent(2)
    assert items == [Interaction(21, "click", 14_500)] and first == 1


def test_the_history_follows_hw_actions_on_a_real_broker(kafka_topics):
    from kafka import KafkaProducer

    from streams.events import Action, encode_actions
    from streams.kafka_io import topic_names

    topic = topic_names(kafka_topics.topic_prefix).actions
    producer = KafkaProducer(bootstrap_servers=kafka_topics.bootstrap_servers)
    now = int(time.time() * 1000)
    producer.send(topic, encode_actions([Action("r1", 5, 50, "click", 1.0, now), Action("r1", 5, 51, "buy", 2.0, now + 1)]))
    producer.send(topic, b"not an event")
    producer.flush()
    h = UserHistory()
    follower = HistoryFollower(h, kafka_topics.bootstrap_servers, topic, ttl_s=3600).start()
    try:
        assert follower.wait_caught_up(30), follower.error
        assert [(it.item_id, it.kind) for it in h.recent(5)[0]] == [(50, "click"), (51, "buy")]
        assert follower.bad == 1
        producer.send(topic, encode_actions([Action("r2", 5, 52, "click", 1.0, now + 2)]))
        producer.flush()
        deadline = time.monotonic() + 10
        while len(h.recent(5)[0]) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [it.item_id for it in h.recent(5)[0]] == [50, 51, 52]  # live, within one poll
    finally:
        follower.stop()
        producer.close()


def test_item_texts_follow_hw_items_upserts_and_tombstones(kafka_topics):
    from kafka import KafkaProducer

    from serving.item_text import ItemTextFollower
    from streams.item_features import ItemFeatures, encode_item_features, item_key
    from streams.kafka_io import topic_names

    topic = topic_names(kafka_topics.topic_prefix).items
    producer = KafkaProducer(bootstrap_servers=kafka_topics.bootstrap_servers)

    def send(f):
        producer.send(topic, encode_item_features(f), key=item_key(f.item_id))

    send(ItemFeatures(1, {"genre": [3]}, [], 10, text="Heat | crime"))
    send(ItemFeatures(2, {"genre": [4]}, [], 10, text="Up | animation"))
    send(ItemFeatures(2, {"genre": [5]}, [], 11))  # features only: the text stays
    send(ItemFeatures.deleted(1, 12))  # a tombstone: forgotten
    producer.send(topic, b"junk", key=item_key(9))
    producer.flush()
    texts = ItemTexts()
    texts.put(7, "from a file")
    follower = ItemTextFollower(texts, kafka_topics.bootstrap_servers, topic).start()
    try:
        assert follower.wait_caught_up(30), follower.error
        assert texts.get([1, 2, 7]) == [None, "Up | animation", "from a file"]
        assert follower.bad == 1
    finally:
        follower.stop()
        producer.close()

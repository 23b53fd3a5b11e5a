"""The online joiner against the real broker and real RocksDB files."""

import numpy as np
import pytest

from streams import metrics
from streams.events import Action, Impression, Watermark, decode_event, example_ids
from streams.joiner import OnlineJoiner
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer

from joinhelp import dead_letters, examples, joiner_config, run_until, send

MIN = 60_000


def has_key(joiner, prefix: bytes) -> bool:
    """Whether the joiner's RocksDB state holds a key of this kind (a parked action: b"o")."""
    return next(iter(joiner.state.db.keys(from_key=prefix)), b"").startswith(prefix)


def imp(rid, user, t, items, **kw):
    return Impression(rid, user, t, items, item_sparse={"cat": [[i % 7] for i in items]},
                      user_sparse={"city": [user % 3]}, **kw)


def test_clicked_items_become_positives_and_the_rest_negatives(kafka_topics, tmp_path):
    send(kafka_topics,
         [imp("r1", 1, 1000, [10, 11, 12], truth_p=[0.1, 0.2, 0.3]), imp("r2", 2, 2000, [10, 13])],
         [[Action("r1", 1, 11, "click", 1.0, 3000)], [Action("r2", 2, 13, "click", 1.0, 2500)]],
         Watermark(5 * MIN))
    joiner = OnlineJoiner(joiner_config(kafka_topics, tmp_path))
    run_until(joiner, lambda: joiner.state.count_pending() == 0 and joiner.watermark >= 5 * MIN)
    joiner.close()
    ex = examples(kafka_topics)
    got = {(int(i), int(e)): l for i, e, l in zip(ex.item_id, ex.example_id, ex.label)}
    assert sorted(k[0] for k in got) == [10, 10, 11, 12, 13]
    assert {k[0]: v for k, v in got.items() if v == 1.0}.keys() == {11, 13}
    np.testing.assert_array_equal(np.sort(ex.example_id), np.sort(np.concatenate(
        [example_ids("r1", np.array([10, 11, 12])), example_ids("r2", np.array([10, 13]))])))
    assert set(ex.sparse) == {"user_id", "item_id", "cat", "city"}
    row = int(np.flatnonzero(ex.item_id == 12)[0])
    assert ex.truth_p[row] == pytest.approx(0.3)
    assert np.isnan(ex.truth_p[ex.item_id == 13]).all()


def test_window_stays_open_until_the_watermark_passes_it(kafka_topics, tmp_path):
    send(kafka_topics, [imp("r1", 1, 1000, [5])])
    joiner = OnlineJoiner(joiner_config(kafka_topics, tmp_path, window_s=60))
    run_until(joiner, lambda: joiner.max_time == 1000)
    assert joiner.state.count_pending() == 1
    send(kafka_topics, [imp("r2", 1, 1000 + 2 * MIN, [6])])
    run_until(joiner, lambda: joiner.state.count_pending() == 1 and joiner.max_time > 1000)
    joiner.close()
    assert list(examples(kafka_topics).item_id) == [5]


def test_late_actions_are_counted_and_routed_not_dropped(kafka_topics, tmp_path):
    send(kafka_topics, [imp("r1", 1, 1000, [5])], watermark=Watermark(10 * MIN))
    joiner = OnlineJoiner(joiner_config(kafka_topics, tmp_path))
    run_until(joiner, lambda: joiner.state.count_pending() == 0 and joiner.watermark > 0)
    before = metrics.LATE.labels("closed")._value.get()
    send(kafka_topics, actions=[[Action("r1", 1, 5, "click", 1.0, 2000)]])
    run_until(joiner, lambda: metrics.LATE.labels("closed")._value.get() > before)
    joiner.close()
    late = dead_letters(kafka_topics, "late")
    assert [d.reason for d in late] == ["closed"]
    # offset 0 of the actions topic holds the watermark; the action is offset 1
    assert late[0].topic == topic_names(kafka_topics.topic_prefix).actions and late[0].offset == 1
    assert examples(kafka_topics).label.tolist() == [0.0]


def test_bad_input_goes_to_the_dlq_with_its_source_and_the_joiner_keeps_going(kafka_topics, tmp_path):
    topics = topic_names(kafka_topics.topic_prefix)
    producer = BatchProducer(kafka_topics)
    producer.send(topics.impressions, b"\x00garbage")
    producer.send(topics.actions, b'{"json": "is not msgpack"}')
    producer.flush()
    producer.close()
    send(kafka_topics, [imp("ok", 1, 1000, [1], dense=[[0.5]])], watermark=Watermark(10 * MIN))
    send(kafka_topics, [imp("ok2", 1, 1000, [2])])
    joiner = OnlineJoiner(joiner_config(kafka_topics, tmp_path))
    run_until(joiner, lambda: joiner.state.count_pending() == 0 and joiner.watermark > 0)
    joiner.close()
    dlq = dead_letters(kafka_topics, "dlq")
    assert sorted((d.topic, d.offset) for d in dlq) == sorted(
        [(topics.impressions, 0), (topics.actions, 0), (topics.impressions, 1)])
    assert any("dense width" in d.reason for d in dlq) and dlq[0].payload
    assert list(examples(kafka_topics).item_id) == [2]


def test_negatives_are_downsampled_at_the_recorded_rate(kafka_topics, tmp_path):
    items = list(range(2000))
    send(kafka_topics, [imp("big", 1, 1000, items)],
         [[Action("big", 1, 7, "click", 1.0, 1500)]], Watermark(10 * MIN))
    joiner = OnlineJoiner(joiner_config(kafka_topics, tmp_path, negative_rate=0.25))
    run_until(joiner, lambda: joiner.state.count_pending() == 0 and joiner.watermark > 0)
    joiner.close()
    ex = examples(kafka_topics)
    pos, neg = ex.label == 1, ex.label == 0
    assert ex.item_id[pos].tolist() == [7] and ex.sample_rate[pos].tolist() == [1.0]
    assert 0.2 < neg.sum() / 1999 < 0.3
    assert (ex.sample_rate[neg] == 0.25).all()


def test_pending_impressions_survive_a_restart(kafka_topics, tmp_path):
    send(kafka_topics, [imp("r1", 1, 1000, [5, 6])])
    cfg = joiner_config(kafka_topics, tmp_path)
    joiner = OnlineJoiner(cfg)
    run_until(joiner, lambda: joiner.max_time == 1000)
    # Read, but pending: the committed offset stays at the impression, for the next owner.
    assert joiner.positions.restart_offsets()[(topic_names(kafka_topics.topic_prefix).impressions, 0)] == 0
    joiner.close()
    send(kafka_topics, actions=[[Action("r1", 1, 6, "click", 1.0, 1200)]], watermark=Watermark(10 * MIN))
    joiner = OnlineJoiner(cfg)
    run_until(joiner, lambda: joiner.rebuilds == 1 and joiner.max_time == 1000
              and joiner.state.count_pending() == 0 and joiner.watermark > 0)
    joiner.close()
    ex = examples(kafka_topics)
    assert dict(zip(ex.item_id.tolist(), ex.label.tolist())) == {5: 0.0, 6: 1.0}


def test_metrics_count_events_examples_dlq_and_pending(kafka_topics, tmp_path):
    from prometheus_client import REGISTRY

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = (value("hw_stream_events_in_total", kind="impression"),
              value("hw_stream_examples_out_total", label="1"),
              value("hw_stream_dlq_total", reason="undecodable"))
    topics = topic_names(kafka_topics.topic_prefix)
    producer = BatchProducer(kafka_topics)
    producer.send(topics.actions, b"\xc1")
    producer.flush()
    producer.close()
    send(kafka_topics, [imp("m1", 1, 1000, [1, 2, 3])], [[Action("m1", 1, 2, "click", 1.0, 1100)]])
    joiner = OnlineJoiner(joiner_config(kafka_topics, tmp_path))
    run_until(joiner, lambda: joiner.max_time == 1000 and
              value("hw_stream_dlq_total", reason="undecodable") > before[2] and
              value("hw_stream_pending_requests") == 1)  # the gauge refreshes about once a second
    assert value("hw_stream_pending_requests") == 1
    send(kafka_topics, watermark=Watermark(10 * MIN))
    run_until(joiner, lambda: value("hw_stream_pending_requests") == 0)
    joiner.close()
    assert value("hw_stream_events_in_total", kind="impression") - before[0] == 3
    assert value("hw_stream_examples_out_total", label="1") - before[1] == 1
    assert value("hw_stream_dlq_total", reason="undecodable") - before[2] == 1
    assert value("hw_stream_pending_requests") == 0


def test_an_action_that_arrives_before_its_impression_still_joins(kafka_topics, tmp_path):
    send(kafka_topics, actions=[[Action("early", 4, 9, "click", 1.0, 1500)]])
    joiner = OnlineJoiner(joiner_config(kafka_topics, tmp_path))
    run_until(joiner, lambda: has_key(joiner, b"o"))
    send(kafka_topics, [imp("early", 4, 1000, [8, 9])], watermark=Watermark(10 * MIN))
    run_until(joiner, lambda: joiner.state.count_pending() == 0 and joiner.watermark > 0)
    joiner.close()
    ex = examples(kafka_topics)
    assert dict(zip(ex.item_id.tolist(), ex.label.tolist())) == {8: 0.0, 9: 1.0}
    assert dead_letters(kafka_topics, "late", idle_s=0.5) == []


def test_an_action_whose_impression_never_comes_expires_as_late(kafka_topics, tmp_path):
    send(kafka_topics, actions=[[Action("ghost", 4, 9, "click", 1.0, 1500)]])
    joiner = OnlineJoiner(joiner_config(kafka_topics, tmp_path))
    run_until(joiner, lambda: has_key(joiner, b"o"))
    send(kafka_topics, watermark=Watermark(10 * MIN))
    run_until(joiner, lambda: not has_key(joiner, b"a"))
    joiner.close()
    late = dead_letters(kafka_topics, "late")
    assert [d.reason for d in late] == ["no_impression"]
    assert decode_event(late[0].payload) == [Action("ghost", 4, 9, "click", 1.0, 1500)]

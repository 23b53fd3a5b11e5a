"""Sources: the synthetic world (ground truth, skew, drift, determinism), CSV replay, JSON input."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from streams.events import Action, Impression, SchemaError, Watermark, decode_event
from streams.generator import GeneratorConfig, SyntheticStream
from streams.kafka_consumer import read_topic
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer
from streams.log_schema import feature_ids
from streams.replay import ReplayConfig, load_requests, produce_json_lines, produce_requests


def auc(p: np.ndarray, y: np.ndarray) -> float:
    ranks = p.argsort().argsort() + 1
    npos = y.sum()
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * (len(y) - npos)))


def test_same_seed_same_stream_and_different_seed_different_stream():
    cfg = GeneratorConfig(seed=5, users=300, items=1000)
    a = [m for b in SyntheticStream(cfg).blocks(600, 200) for m in SyntheticStream(cfg).messages(b)]
    b = [m for b in SyntheticStream(cfg).blocks(600, 200) for m in SyntheticStream(cfg).messages(b)]
    c = [m for b in SyntheticStream(GeneratorConfig(seed=6, users=300, items=1000)).blocks(600, 200)
         for m in SyntheticStream(cfg).messages(b)]
    assert a == b and a != c


def test_clicks_follow_the_exposed_ground_truth_probability():
    world = SyntheticStream(GeneratorConfig(seed=1))
    block = world.block(4000)
    p, y = block.truth_p.ravel(), block.clicked.ravel()
    assert abs(y.mean() - p.mean()) < 0.01  # clicks are Bernoulli(truth_p)
    assert auc(p, y) > 0.75  # the truth is informative: the best achievable AUC is well above 0.5
    np.testing.assert_allclose(
        world.truth_p(block.user_id, block.items, block.event_time_ms), block.truth_p, rtol=1e-6)


def test_item_exposure_is_zipf_skewed_and_items_are_distinct_per_request():
    cfg = GeneratorConfig(seed=2, items=5000)
    block = SyntheticStream(cfg).block(3000)
    counts = np.sort(np.bincount(block.items.ravel(), minlength=cfg.items))[::-1]
    assert counts[:50].sum() > 0.3 * counts.sum()  # the head gets much of the exposure
    assert all(len(set(row)) == len(row) for row in block.items.tolist())


def test_user_interests_drift_with_event_time():
    cfg = GeneratorConfig(seed=3, drift_period_s=100.0)
    world = SyntheticStream(cfg)
    users, items = np.arange(50), np.tile(np.arange(20), (50, 1))
    now = np.full(50, cfg.start_time_ms)
    later = now + 25_000  # a quarter period
    assert np.abs(world.truth_p(users, items, now) - world.truth_p(users, items, later)).mean() > 0.01
    np.testing.assert_allclose(world.truth_p(users, items, now),
                               world.truth_p(users, items, now + 100_000), atol=1e-5)


def test_generated_messages_decode_with_the_schema_and_carry_truth_p():
    world = SyntheticStream(GeneratorConfig(seed=4))
    block = world.block(20)
    events = [decode_event(v) for _, v in world.messages(block)]
    imps = [e for e in events if isinstance(e, Impression)]
    assert len(imps) == 20 and imps[0].truth_p == pytest.approx(block.truth_p[0].tolist(), abs=1e-6)
    assert sum(len(e) for e in events if isinstance(e, list)) == int(block.clicked.sum())


def write_csv(path, text):
    path.write_text(text)
    return path


def test_csv_rows_become_requests_in_event_time_order(tmp_path):
    f = write_csv(tmp_path / "log.csv", "user_id,item_id,label,ts,genre,dense_age\n"
                  "1,10,0,2000,3,0.5\n2,20,1,1000,4,1.5\n1,11,1,2000,5,2.5\n")
    schema = write_csv(tmp_path / "schema.toml", '[columns.genre]\nkind = "categorical"\n')
    reqs = list(load_requests(f, ReplayConfig(schema=str(schema))))
    assert [(imp.user_id, imp.items, imp.event_time_ms) for imp, _ in reqs] == [
        (2, [20], 1_000_000), (1, [10, 11], 2_000_000)]  # ts in seconds -> ms
    imp, clicks = reqs[1]
    # genre (categorical by the schema file) is a hashed slot; dense_age is inferred numeric,
    # standardised online (0 until two values were seen) with a missing indicator.
    assert imp.item_sparse == {"genre": [feature_ids("genre", ["3"]).tolist(),
                                         feature_ids("genre", ["5"]).tolist()]}
    assert imp.dense == [[0.0, 0.0], [3.0, 0.0]]
    assert clicks == [Action(imp.request_id, 1, 11, "click", 1.0, 2_000_001)]


@pytest.mark.parametrize("text, reason", [
    ("user_id,label,ts\n1,0,5\n", r"missing columns \['item_id'\]"),
    ("user_id,item_id,label,ts\n1,2,0,5\n1,2\n", "line 3, column 'label'"),
    ("user_id,item_id,label,ts\n1,2,x,5\n", "line 2, column 'label'"),
])
def test_malformed_csv_is_rejected_with_a_clear_error(tmp_path, text, reason):
    with pytest.raises(SchemaError, match=reason):
        list(load_requests(write_csv(tmp_path / "bad.csv", text)))


def test_replay_produces_impressions_actions_and_a_final_watermark(kafka_topics, tmp_path):
    f = write_csv(tmp_path / "log.csv", "user_id,item_id,label,ts\n1,10,1,1700000000000\n"
                  "1,11,0,1700000000000\n2,12,0,1700000001000\n")
    topics = topic_names(kafka_topics.topic_prefix)
    producer = BatchProducer(kafka_topics)
    assert produce_requests(load_requests(f), producer, topics) == 4  # 3 shown items + 1 click
    producer.close()
    imps = [decode_event(r.value) for r in read_topic(kafka_topics, topics.impressions, idle_s=0.5)]
    acts = [decode_event(r.value) for r in read_topic(kafka_topics, topics.actions, idle_s=0.5)]
    assert [i.items for i in imps[:2]] == [[10, 11], [12]] and isinstance(imps[2], Watermark)
    assert acts[0][0].item_id == 10 and isinstance(acts[1], Watermark)


def test_json_lines_are_produced_and_bad_lines_reported(kafka_topics):
    lines = io.StringIO("\n".join([
        json.dumps({"type": "impression", "request_id": "r", "user_id": 1, "event_time_ms": 5,
                    "items": [1, 2]}),
        "{not json",
        json.dumps({"type": "action", "request_id": "r", "user_id": 1, "item_id": 2,
                    "event_time_ms": 9}),
    ]))
    topics = topic_names(kafka_topics.topic_prefix)
    producer = BatchProducer(kafka_topics)
    assert produce_json_lines(lines, producer, topics) == (2, 1)
    producer.close()
    assert len(read_topic(kafka_topics, topics.actions, idle_s=0.5)) == 1


def test_headwater_produce_json_command_end_to_end(kafka_topics):
    line = json.dumps({"type": "impression", "request_id": "cli", "user_id": 3,
                       "event_time_ms": 1, "items": [7]})
    out = subprocess.run([sys.executable, "-m", "headwater", "produce", "--json",
                          "--bootstrap-servers", kafka_topics.bootstrap_servers,
                          "--topic-prefix", kafka_topics.topic_prefix],
                         input=line + "\n", capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"sent": 1, "rejected": 0}
    got = read_topic(kafka_topics, topic_names(kafka_topics.topic_prefix).impressions, idle_s=0.5)
    assert decode_event(got[0].value).request_id == "cli"


def test_users_of_one_segment_share_taste_and_items_of_one_category_share_appeal():
    world = SyntheticStream(GeneratorConfig(seed=8))
    t = np.full(world.cfg.users, world.cfg.start_time_ms)
    u = world.user_vectors(np.arange(world.cfg.users), t)
    seg = world.segment
    same = np.flatnonzero(seg == seg[0])[:50]
    other = np.flatnonzero(seg != seg[0])[:50]
    cos = lambda a, b: (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    assert cos(u[same], u[same]).mean() > 0.9 > 0.3 > abs(cos(u[same], u[other]).mean())
    cat = world.category
    v_same = world.item_v[np.flatnonzero(cat == cat[0])[:50]]
    assert cos(v_same, v_same).mean() > 0.9


def test_world_flags_change_the_world_and_bad_values_are_rejected():
    world = SyntheticStream(GeneratorConfig(seed=9, segments=4, categories=5, dim=3))
    assert set(world.segment.tolist()) <= set(range(4)) and world.item_v.shape[1] == 3
    assert set(world.category.tolist()) == set(range(5))
    hot = SyntheticStream(GeneratorConfig(seed=9, temperature=4.0)).block(2000)
    cold = SyntheticStream(GeneratorConfig(seed=9)).block(2000)
    assert auc(hot.truth_p.ravel(), hot.clicked.ravel()) < auc(cold.truth_p.ravel(), cold.clicked.ravel()) - 0.05
    for bad in (dict(segments=0), dict(categories=0), dict(temperature=0.0), dict(user_noise=-1.0)):
        with pytest.raises(ValueError):
            GeneratorConfig(**bad).validate()


def test_block_examples_are_what_the_joiner_would_emit():
    from streams.ids import example_ids

    world = SyntheticStream(GeneratorConfig(seed=10))
    block = world.block(30)
    ex = world.examples(block)
    k = world.cfg.items_per_request
    assert len(ex) == 30 * k and set(ex.sparse) == {"user_id", "item_id", "segment", "category"}
    np.testing.assert_array_equal(ex.example_id[:k], example_ids("g10-0", block.items[0]))
    np.testing.assert_array_equal(ex.label, block.clicked.ravel().astype(np.float32))
    np.testing.assert_array_equal(ex.sparse["category"].values, world.category[block.items.ravel()])
    np.testing.assert_array_equal(ex.sparse["segment"].values, world.segment[np.repeat(block.user_id, k)])
    np.testing.assert_allclose(ex.truth_p, block.truth_p.ravel())
    imp = decode_event(next(v for t, v in world.messages(block) if t == "impressions"))
    assert imp.user_sparse["segment"] == [int(world.segment[block.user_id[0]])]


class _Recorder:
    """The generator's sink: each event as sent, with the wall time it was sent at."""

    def __init__(self):
        self.sent = []  # (wall ms when sent, event)

    def send(self, topic, value, key=None):
        import time

        self.sent.append((time.time() * 1000, decode_event(value)))

    def flush(self):
        pass


def test_a_live_generator_starts_its_event_clock_when_it_sends_and_keeps_to_it():
    """start_time_ms=0 with a rate: event time is the wall clock from the first send, and paced
    blocks are short, so events never run seconds ahead of (or behind) their event time."""
    import time

    from streams.generator import produce_synthetic

    cfg = GeneratorConfig(users=50, items=100, items_per_request=5, requests=120, start_time_ms=0,
                          events_per_s=2000, request_interval_ms=2.5, final_watermark=False)
    time.sleep(0.2)  # what a slow start-up would cost: not counted in event time
    rec = _Recorder()
    t0 = int(time.time() * 1000)
    produce_synthetic(cfg, rec, topic_names("t"))
    imps = [(sent, e) for sent, e in rec.sent if isinstance(e, Impression)]
    assert len(imps) == 120
    assert t0 <= imps[0][1].event_time_ms <= t0 + 50
    # Each impression goes out at most ~100 ms (one block) before its event time, and never
    # seconds after it (late only by a stall: a loaded 2-core box has held this thread 455 ms).
    ahead = [e.event_time_ms - sent for sent, e in imps]
    assert max(ahead) <= 110 and min(ahead) >= -1000


def test_a_live_generator_with_history_sends_the_past_at_once_then_keeps_to_the_clock():
    """history_s: the first requests carry the last S seconds of event time and go out unpaced
    (a deployment's recent log), the rest follow the wall clock as without history."""
    import time

    from streams.generator import produce_synthetic

    cfg = GeneratorConfig(users=50, items=100, items_per_request=5, requests=240, start_time_ms=0,
                          events_per_s=2000, request_interval_ms=2.5, final_watermark=False,
                          history_s=0.3)
    rec = _Recorder()
    t0 = int(time.time() * 1000)
    produce_synthetic(cfg, rec, topic_names("t"))
    imps = [(sent, e) for sent, e in rec.sent if isinstance(e, Impression)]
    assert len(imps) == 240
    assert t0 - 300 <= imps[0][1].event_time_ms <= t0 - 250
    past = [(sent, e) for sent, e in imps if e.event_time_ms < t0 - 20]
    assert len(past) >= 110 and past[-1][0] - past[0][0] < 150  # the history: at once
    ahead = [e.event_time_ms - sent for sent, e in imps if e.event_time_ms > t0 + 100]
    assert ahead and max(ahead) <= 110 and min(ahead) >= -150  # then live, as without history
    with pytest.raises(ValueError, match="history_s"):
        GeneratorConfig(start_time_ms=1_000, history_s=5.0).validate()

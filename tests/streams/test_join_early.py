"""Early emission (``--emit early``): negatives after the hold, a positive copy per later click."""

import numpy as np

from streams.events import Action, Impression, Watermark, decode_examples, encode_examples, example_ids
from streams.example_batch import EMIT_EARLY, EMIT_WINDOW
from streams.join_build import ClosedRequest, build_early, build_examples, positive_copy_ids
from streams.join_state import PendingAction
from streams.joiner import OnlineJoiner

from joinhelp import examples, joiner_config, run_until, send

MIN = 60_000
POS = frozenset({"click"})


def _imp(rid, items, t=1000):
    return {"request_id": rid, "user_id": 7, "event_time_ms": t, "items": items,
            "item_sparse": {"cat": [[i % 5] for i in items]}, "user_sparse": {}, "dense": None,
            "truth_p": None}


def test_hold_emits_every_item_as_a_negative_and_a_click_as_a_distinct_positive_copy():
    req = ClosedRequest(_imp("r1", [10, 11, 12]), [PendingAction(11, "click", 1.0, 1500, 7)])
    batch, unjoined, dropped = build_early([req], MIN, POS, 1.0, 0)
    ids = example_ids("r1", np.array([10, 11, 12]))
    assert batch.label.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert batch.example_id[:3].tolist() == ids.tolist()
    assert batch.example_id[3] == positive_copy_ids(ids[1:2])[0] != ids[1]
    assert (batch.emit == EMIT_EARLY).all() and not unjoined and dropped == 0


def test_a_late_click_emits_only_its_positive_copy_and_a_repeat_has_the_same_id():
    req = ClosedRequest(_imp("r1", [10, 11]), [PendingAction(10, "click", 1.0, 30_000, 7)])
    first, _, _ = build_early([req], MIN, POS, 1.0, 0, negatives=False)
    again, _, _ = build_early([req], MIN, POS, 1.0, 0, negatives=False)
    assert first.label.tolist() == [1.0] and first.item_id.tolist() == [10]
    assert first.example_id.tolist() == again.example_id.tolist()


def test_a_click_after_the_window_labels_nothing_and_is_reported():
    req = ClosedRequest(_imp("r1", [10]), [PendingAction(10, "click", 1.0, 1000 + 2 * MIN, 7)])
    batch, unjoined, _ = build_early([req], MIN, POS, 1.0, 0, negatives=False)
    assert len(batch) == 0 and [u.reason for u in unjoined] == ["outside_window"]


def test_windowed_build_is_unchanged_and_marked_window():
    req = ClosedRequest(_imp("r1", [10, 11]), [PendingAction(11, "click", 1.0, 1500, 7)])
    batch, _, _ = build_examples([req], MIN, POS, 1.0, 0)
    assert batch.label.tolist() == [0.0, 1.0]
    assert batch.example_id.tolist() == example_ids("r1", np.array([10, 11])).tolist()
    assert (batch.emit == EMIT_WINDOW).all()


def test_emit_column_round_trips_and_older_messages_read_as_window():
    req = ClosedRequest(_imp("r1", [10, 11]), [PendingAction(11, "click", 1.0, 1500, 7)])
    early, _, _ = build_early([req], MIN, POS, 1.0, 0)
    assert decode_examples(encode_examples(early)).emit.tolist() == [EMIT_EARLY] * 3
    window, _, _ = build_examples([req], MIN, POS, 1.0, 0)
    assert b"emit" not in encode_examples(window)  # the older wire form, unchanged
    assert decode_examples(encode_examples(window)).emit.tolist() == [EMIT_WINDOW] * 2


def test_joiner_in_early_mode_emits_negatives_at_the_hold_and_a_late_click_at_once(kafka_topics, tmp_path):
    send(kafka_topics, [Impression("r1", 1, 1000, [10, 11]), Impression("r2", 1, 5000, [12])])
    joiner = OnlineJoiner(joiner_config(kafka_topics, tmp_path, emit="early", early_hold_s=1.0))
    # r1's hold (ends at 2000) is behind the newest impression (5000); r2's (6000) is not.
    run_until(joiner, lambda: len(joiner.state.due_holds(10_000, 10)) == 1)
    ex = examples(kafka_topics)
    assert sorted(ex.item_id.tolist()) == [10, 11] and ex.label.tolist() == [0.0, 0.0]
    send(kafka_topics, actions=[[Action("r1", 1, 11, "click", 1.0, 4000)]])
    run_until(joiner, lambda: len(examples(kafka_topics, idle_s=0.3)) == 3, max_steps=40)
    assert joiner.state.count_pending() == 2  # still open: later clicks may come
    send(kafka_topics, watermark=Watermark(10 * MIN))
    run_until(joiner, lambda: joiner.state.count_pending() == 0)
    joiner.close()
    ex = examples(kafka_topics)
    assert sorted(zip(ex.item_id.tolist(), ex.label.tolist())) == [
        (10, 0.0), (11, 0.0), (11, 1.0), (12, 0.0)]
    assert len(np.unique(ex.example_id)) == 4 and (ex.emit == EMIT_EARLY).all()


def test_a_backlog_is_emitted_so_no_click_comes_after_its_impression_looks_final(kafka_topics, tmp_path):
    """A joiner reading a backlog (after a restart, or a deployment's recent log) gets a minute of
    impressions at once while the actions topic trails. The trainer takes an impression's label
    for final once its newest row is a label wait (window + lateness) newer, so no copy may come
    after a row that much newer than its impression, and none before its negative. Negatives
    keyed to the newest impression read, all of a step's before its copies, broke both."""
    window_ms, lateness_ms = 10_000, 5_000
    rng = np.random.default_rng(0)
    imps, acts = [], []
    for r in range(600):  # a minute of event time, a request every 100 ms
        t = 1_000_000 + 100 * r
        imps.append(Impression(f"r{r}", r % 50, t, [r % 97, 100 + r % 89]))
        if r % 3 == 0:
            acts.append([Action(f"r{r}", r % 50, 100 + r % 89, "click", 1.0, t + int(rng.integers(1, 5_000)))])
    send(kafka_topics, imps)
    joiner = OnlineJoiner(joiner_config(kafka_topics, tmp_path, emit="early", early_hold_s=1.0,
                                        window_s=window_ms / 1000, allowed_lateness_s=lateness_ms / 1000,
                                        idle_topic_s=30.0, idle_close_s=0.0, poll_max_records=100))
    run_until(joiner, lambda: joiner.max_time >= imps[-1].event_time_ms, max_steps=200)
    send(kafka_topics, actions=acts)  # the actions topic trails the impressions read
    send(kafka_topics, watermark=Watermark(imps[-1].event_time_ms + 10 * MIN))
    run_until(joiner, lambda: joiner.state.count_pending() == 0, max_steps=400)
    assert joiner.state.count_pending() == 0
    joiner.close()
    ex = examples(kafka_topics)
    copies = np.flatnonzero(ex.label > 0.5)
    assert len(copies) == len(acts) and len(ex) == 2 * len(imps) + len(acts)
    newest_before = np.maximum.accumulate(ex.event_time_ms)
    for i in copies.tolist():
        assert newest_before[i] - ex.event_time_ms[i] < window_ms + lateness_ms, i
    negative_at = {int(e): i for i, e in enumerate(positive_copy_ids(ex.example_id).tolist())}
    assert all(negative_at[int(ex.example_id[i])] < i for i in copies.tolist())

"""A new owner of the joiner's partitions does not send to ``hw.late`` again what the old owner
had resolved (streams.join_handoff).

The old owner commits the oldest record still pending, so the new one re-reads actions whose
requests already closed (their impressions are not re-read) and orphans already sent late.
The hand-off record tells it which; without one (or with a malformed one) it falls back to
sending them late again: at-least-once, never lost.
"""

import logging
import threading
import time
import uuid

import pytest

from streams.events import Action, Impression, Watermark, decode_event
from streams.join_handoff import HandOff, Resolved, decode_resolved, encode_resolved, record_key
from streams.joiner import OnlineJoiner
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer

from joinhelp import dead_letters, examples, joiner_config, run_until, send

MIN = 60_000


def click(rid: str, item: int, t: int) -> list[Action]:
    return [Action(rid, 1, item, "click", 1.0, t)]


def late_counts(kafka) -> dict[str, int]:
    """How often each request id's action is on hw.late."""
    out: dict[str, int] = {}
    for d in dead_letters(kafka, "late", idle_s=0.5):
        for a in decode_event(d.payload):
            out[a.request_id] = out.get(a.request_id, 0) + 1
    return out


def _parked(joiner: OnlineJoiner) -> int:
    return sum(1 for k in joiner.state.db.keys(from_key=b"o") if k.startswith(b"o"))


def old_owner_then_new(kafka, tmp_path, between=lambda cfg: None, old_writes=True,
                       monkeypatch=None) -> tuple[OnlineJoiner, str]:
    """The old owner closes r1 (its click joined) and sends ghost ``x`` late; ``z`` stays parked
    and r2 pending, holding both committed offsets back before them. It stops; ``y`` (never read
    by it) comes; the new owner of the group re-reads from the committed offsets."""
    # Lateness far beyond the times used: only the producers' watermarks move the joiner's.
    cfg = joiner_config(kafka, tmp_path, window_s=60.0, allowed_lateness_s=200.0,
                        group_id=f"handoff-{uuid.uuid4().hex[:8]}")
    send(kafka, [Impression("r1", 1, 1000, [1, 2]), Impression("r2", 1, 100_000, [5])],
         [click("r2", 5, 100_500), click("r1", 2, 1500), click("x", 7, 2000),
          click("z", 8, 90_000)], watermark=Watermark(100_000))
    old = OnlineJoiner(cfg)
    if not old_writes:  # an owner that wrote no record (an older version, or it was lost)
        monkeypatch.setattr(old.handoff, "publish", lambda *a, **k: None)
    run_until(old, lambda: old.watermark >= 100_000 and old.state.count_pending() == 1
              and _parked(old) == 1)
    old.close()
    assert late_counts(kafka) == {"x": 1}
    send(kafka, actions=[click("y", 9, 3000)], watermark=Watermark(10 * MIN))
    between(cfg)
    new = OnlineJoiner(cfg)
    run_until(new, lambda: new.watermark >= 10 * MIN and new.state.count_pending() == 0
              and _parked(new) == 0)
    new.close()
    labels = examples(kafka)
    got = set(zip(labels.item_id.tolist(), labels.label.tolist()))
    assert got == {(1, 0.0), (2, 1.0), (5, 1.0)}
    return new, cfg.group_id


def test_a_new_owner_drops_re_read_actions_the_old_owner_had_resolved(kafka_topics, tmp_path):
    new, _ = old_owner_then_new(kafka_topics, tmp_path)
    # r1's click (joined) and x (already late) are not late again; z, parked past the old
    # owner's watermark, and y, never read by it, reach hw.late once each.
    assert late_counts(kafka_topics) == {"x": 1, "y": 1, "z": 1}
    assert new.replayed_resolved == 2


def test_the_new_owner_hands_over_what_it_resolved_in_turn(kafka_topics, tmp_path):
    _, group = old_owner_then_new(kafka_topics, tmp_path)
    topics = topic_names(kafka_topics.topic_prefix)
    handoff = HandOff(kafka_topics, topics.join_positions, group, BatchProducer(kafka_topics))
    got = handoff.load({(topics.impressions, 0), (topics.actions, 0)})
    # impressions: r1, r2, two watermarks; actions: four, a watermark, y, a watermark
    assert got == {(topics.impressions, 0): Resolved(4, 10 * MIN, frozenset()),
                   (topics.actions, 0): Resolved(7, 10 * MIN, frozenset())}
    handoff.producer.close()


def test_the_click_of_a_request_that_closed_just_before_the_hand_off_is_not_late_again(
        kafka_topics, tmp_path):
    """r3 closed a moment before the old owner stopped, so its click's parking would expire
    after the old owner's watermark: only the record's list of the actions still parked (z)
    tells the new owner that the click was resolved (joined), not waiting for its impression."""
    cfg = joiner_config(kafka_topics, tmp_path, window_s=60.0, allowed_lateness_s=200.0,
                        group_id=f"handoff-{uuid.uuid4().hex[:8]}")
    send(kafka_topics, [Impression("r3", 1, 30_000, [3]), Impression("r2", 1, 100_000, [5])],
         [click("r2", 5, 100_500), click("r3", 3, 45_000), click("z", 8, 90_000)],
         watermark=Watermark(100_000))
    old = OnlineJoiner(cfg)
    run_until(old, lambda: old.watermark >= 100_000 and old.state.count_pending() == 1
              and _parked(old) == 1)
    old.close()
    assert late_counts(kafka_topics) == {}
    topics = topic_names(kafka_topics.topic_prefix)
    handoff = HandOff(kafka_topics, topics.join_positions, cfg.group_id, BatchProducer(kafka_topics))
    record = handoff.load({(topics.actions, 0)})[(topics.actions, 0)]
    handoff.producer.close()
    assert record == Resolved(4, 100_000, frozenset({2}))  # r2's, r3's and z's clicks, a watermark
    assert record.covers(1, 45_000 + 60_000) and not Resolved(4, 100_000).covers(1, 45_000 + 60_000)
    send(kafka_topics, watermark=Watermark(10 * MIN))
    new = OnlineJoiner(cfg)
    run_until(new, lambda: new.watermark >= 10 * MIN and new.state.count_pending() == 0
              and _parked(new) == 0)
    new.close()
    assert late_counts(kafka_topics) == {"z": 1}
    assert new.replayed_resolved == 1
    labels = examples(kafka_topics)
    assert set(zip(labels.item_id.tolist(), labels.label.tolist())) == {(3, 1.0), (5, 1.0)}


def test_without_a_record_the_new_owner_sends_them_late_again(kafka_topics, tmp_path, monkeypatch):
    new, _ = old_owner_then_new(kafka_topics, tmp_path, old_writes=False, monkeypatch=monkeypatch)
    assert late_counts(kafka_topics) == {"x": 2, "r1": 1, "y": 1, "z": 1}  # at least once
    assert new.replayed_resolved == 0


def test_a_malformed_record_is_ignored_with_a_warning(kafka_topics, tmp_path, caplog):
    topics = topic_names(kafka_topics.topic_prefix)

    def spoil(cfg):
        producer = BatchProducer(kafka_topics)
        producer.send(topics.join_positions, b"{not json",
                      key=record_key(cfg.group_id, (topics.actions, 0)))
        producer.flush()
        producer.close()

    with caplog.at_level(logging.WARNING, logger="streams.join_handoff"):
        new, _ = old_owner_then_new(kafka_topics, tmp_path, between=spoil)
    assert "ignoring a join position record" in caplog.text
    assert late_counts(kafka_topics) == {"x": 2, "r1": 1, "y": 1, "z": 1}
    assert new.replayed_resolved == 0


def test_a_rebalance_hands_over_exactly_when_partitions_are_revoked(kafka_topics, tmp_path,
                                                                   monkeypatch):
    """A second joiner joins the group while the first runs; whichever owns the partitions
    after the rebalance re-reads them and finds the record written at the revocation (the
    throttled writes are off here, so that record is the only one that can tell)."""
    monkeypatch.setattr(HandOff, "every_s", 3600.0)
    group = f"handoff-{uuid.uuid4().hex[:8]}"
    send(kafka_topics, [Impression("r1", 1, 1000, [1, 2]), Impression("r2", 1, 100_000, [5])],
         [click("r2", 5, 100_500), click("r1", 2, 1500), click("x", 7, 2000)],
         watermark=Watermark(100_000))
    joiners, stop, threads = [], threading.Event(), []

    def start(name: str) -> OnlineJoiner:
        joiner = OnlineJoiner(joiner_config(kafka_topics, tmp_path / name, window_s=60.0,
                                            allowed_lateness_s=200.0, group_id=group))
        joiners.append(joiner)
        threads.append(threading.Thread(target=joiner.run, args=(stop,), daemon=True))
        threads[-1].start()
        return joiner

    try:
        a = start("a")
        _wait(lambda: late_counts(kafka_topics) == {"x": 1} and a.watermark >= 100_000, 60)
        b = start("b")
        _wait(lambda: a.rebuilds >= 2 and b.rebuilds >= 1, 60)  # both in the new generation
        send(kafka_topics, actions=[click("y", 9, 3000)], watermark=Watermark(10 * MIN))
        _wait(lambda: late_counts(kafka_topics).get("y", 0) >= 1, 60)
        time.sleep(2.0)  # room for a repeat to show
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert late_counts(kafka_topics) == {"x": 1, "y": 1}
    assert sum(j.replayed_resolved for j in joiners) == 2  # r1's click and x, re-read once


def _wait(cond, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_record_covers_what_was_read_and_resolved_by_its_watermark():
    r = Resolved(read_end=10, watermark=5000)
    assert r.covers(9, 5000) and not r.covers(10, 100) and not r.covers(0, 5001)
    assert r.claims_at_least(None) and r.claims_at_least(Resolved(10, 4000))
    assert not Resolved(11, 4999).claims_at_least(r)  # claims more of one, less of the other
    listed = Resolved(read_end=10, watermark=0, parked=frozenset({3}))  # the parked ones listed
    assert listed.covers(9, 10**9) and not listed.covers(3, 0) and not listed.covers(10, 0)
    assert not r.claims_at_least(listed)  # a record without the list never replaces one with it


@pytest.mark.parametrize("value", [b"", b"[]", b'{"v": 2, "group": "g", "topic": "t", "partition": 0,'
                                   b' "read_end": 1, "watermark": 1}',
                                   b'{"v": 1, "group": "g", "topic": "t", "partition": 0,'
                                   b' "read_end": -1, "watermark": 1}',
                                   b'{"v": 1, "group": "g", "topic": "t", "partition": 0,'
                                   b' "read_end": 1.5, "watermark": 1}',
                                   b'{"v": 1, "group": "g", "topic": "t", "partition": 0,'
                                   b' "read_end": 1, "watermark": 1, "parked": [-1]}',
                                   b'{"v": 1, "group": "g", "topic": "t", "partition": 0,'
                                   b' "read_end": 1, "watermark": 1, "parked": 3}'])
def test_a_malformed_record_does_not_decode(value):
    with pytest.raises(ValueError):
        decode_resolved(value)


def test_a_record_round_trips():
    tp = ("hw.actions", 3)
    for r in (Resolved(12, 34), Resolved(12, 34, frozenset()), Resolved(12, 34, frozenset({5, 7}))):
        assert decode_resolved(encode_resolved("g", tp, r)) == ("g", tp, r)

"""A restarted joiner closes no window before it has read what its inputs still hold.

Issue 18: after a kill -9 the joiner restarts, rebuilds its pending requests from the input, and
clicks for them are unread in ``hw.actions``. The consumer owns no partition until it has joined its group
(seconds on Tansu); the watermark and the idle close must not treat that time as "every input
read", or the windows close with those clicks missing (label 0, the click then late or unread).
Nor may the burst of closes after a restart send a parked click (it came before its impression)
to hw.late while its request, read since, is still waiting to close.
"""

import uuid

from streams.events import Action, Impression, Watermark
from streams.joiner import OnlineJoiner

from joinhelp import dead_letters, examples, joiner_config, run_until, send

MIN = 60_000


def imp(rid: str, t: int, items: list[int]) -> Impression:
    return Impression(rid, 1, t, items)


def click(rid: str, item: int, t: int) -> list[Action]:
    return [Action(rid, 1, item, "click", 1.0, t)]


def config(kafka, tmp_path, **kw):
    return joiner_config(kafka, tmp_path, group_id=f"restart-{uuid.uuid4().hex[:8]}", **kw)


def labels(kafka) -> dict[int, float]:
    ex = examples(kafka)
    return dict(zip(ex.item_id.tolist(), ex.label.tolist()))


def test_a_restarted_joiner_holds_its_watermark_until_it_has_read_its_inputs(kafka_topics,
                                                                              tmp_path):
    # Before the restart: three requests pending, the watermark held back by a recent action
    # (max impression time is 2 min, past the 1 min windows of r0 and r1).
    send(kafka_topics,
         [imp("r0", 400, [1]), imp("r1", 1000, [2, 3]), imp("r2", 2 * MIN + 1000, [4])],
         [click("r0", 1, 500)])
    cfg = config(kafka_topics, tmp_path, window_s=60.0, idle_topic_s=60.0)
    joiner = OnlineJoiner(cfg)
    run_until(joiner, lambda: joiner.max_time == 2 * MIN + 1000
              and joiner.state.count_pending() == 3 and joiner.watermark == 500)
    joiner.close()
    assert joiner.watermark == 500
    # While it is down, a click for r1 arrives; the restarted joiner must read it before r1 closes.
    send(kafka_topics, actions=[click("r1", 3, 1500)], watermark=Watermark(10 * MIN))
    joiner = OnlineJoiner(cfg)
    run_until(joiner, lambda: joiner.state.count_pending() == 0 and joiner.watermark >= 10 * MIN)
    joiner.close()
    assert labels(kafka_topics) == {1: 1.0, 2: 0.0, 3: 1.0, 4: 0.0}
    assert dead_letters(kafka_topics, "late", idle_s=0.5) == []


def test_idle_close_counts_only_the_time_the_inputs_are_read_to_their_end(kafka_topics, tmp_path):
    send(kafka_topics, [imp("r1", 1000, [2, 3])])
    cfg = config(kafka_topics, tmp_path, window_s=60.0)
    joiner = OnlineJoiner(cfg)
    run_until(joiner, lambda: joiner.state.count_pending() == 1)
    joiner.close()
    send(kafka_topics, actions=[click("r1", 3, 1500)])
    # Any step without input closes every window, once the inputs are read to their end.
    cfg.idle_close_s = 0.001
    joiner = OnlineJoiner(cfg)
    run_until(joiner, lambda: joiner.max_time == 1000 and joiner.state.count_pending() == 0)
    joiner.close()
    assert labels(kafka_topics) == {2: 0.0, 3: 1.0}
    assert dead_letters(kafka_topics, "late", idle_s=0.5) == []


def test_a_parked_action_joins_its_request_when_both_come_due_in_one_step(kafka_topics, tmp_path):
    # The click comes before its impression (parked), then one watermark makes r0, r1 and the
    # parked click due together; r1 closes a step after the click's parking expired.
    send(kafka_topics, actions=[click("r1", 3, 150)])
    joiner = OnlineJoiner(config(kafka_topics, tmp_path, window_s=60.0, max_close_per_step=1))
    run_until(joiner, lambda: _parked(joiner))
    send(kafka_topics, [imp("r0", 0, [1]), imp("r1", 100, [2, 3])], watermark=Watermark(10 * MIN))
    run_until(joiner, lambda: joiner.state.count_pending() == 0 and joiner.watermark >= 10 * MIN
              and not _parked(joiner))
    joiner.close()
    assert labels(kafka_topics) == {1: 0.0, 2: 0.0, 3: 1.0}
    assert dead_letters(kafka_topics, "late", idle_s=0.5) == []


def _parked(joiner: OnlineJoiner) -> bool:
    """Whether the state holds a parked action (an ``o`` key)."""
    return next(iter(joiner.state.db.keys(from_key=b"o")), b"").startswith(b"o")

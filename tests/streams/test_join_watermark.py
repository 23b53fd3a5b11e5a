"""The joiner's watermark: an input partition stops holding it only once the broker has said it
was quiet for ``idle_s`` (a fetch answer sent that long after its last message), whatever the
wall clock or a stale end from before a pause says."""

from streams.join_watermark import JoinWatermark

IMP, ACT = ("hw.impressions", 0), ("hw.actions", 0)


def _clock() -> JoinWatermark:
    clock = JoinWatermark(("hw.impressions", "hw.actions"), lateness_ms=0, idle_s=2.0)
    clock.delivered(IMP, 10.0)
    clock.impression(IMP, 60_000)
    clock.delivered(ACT, 11.0)
    clock.action(ACT, 50_000)
    return clock


def test_a_resumed_partition_holds_the_watermark_until_quiet_again():
    clock = _clock()
    assigned = {IMP, ACT}
    assert clock.update(assigned, set(), {IMP: 14.0, ACT: 14.0}) == 60_000  # both read and quiet
    clock.quiet_from(assigned, now=20.0)  # fetching resumes after a pause
    clock.delivered(IMP, 20.1)
    clock.impression(IMP, 120_000)
    # The actions partition's end is stale: it holds at what it had delivered (50_000, below
    # the watermark, which never moves back). Without the rule it would count as idle and
    # 120_000 would pass before its new actions are read.
    assert clock.update(assigned, set(), {IMP: 20.5, ACT: 20.5}) == 60_000
    assert clock.update(assigned, set(), {IMP: 22.1, ACT: 22.1}) == 120_000  # quiet for idle_s: idle


def test_wall_time_alone_never_makes_a_partition_idle():
    """A loaded joiner applies no fetch answer for seconds: however long ago the last action came,
    an end last confirmed before the partition had been quiet for idle_s holds the watermark."""
    clock = _clock()
    assigned = {IMP, ACT}
    clock.delivered(IMP, 13.5)
    clock.impression(IMP, 90_000)
    # the actions partition's newest answer was sent 0.5 s after its last message; by now (any
    # wall time) it has been quiet for long, but nobody asked the broker since
    assert clock.update(assigned, set(), {IMP: 16.0, ACT: 11.5}) == 50_000
    assert clock.update(assigned, set(), {IMP: 16.0}) == 50_000  # never answered: holds too
    assert clock.update(assigned, set(), {IMP: 16.0, ACT: 13.0}) == 90_000  # 2 s after: idle


def test_a_partition_behind_holds_whatever_its_answers_say():
    clock = _clock()
    assert clock.update({IMP, ACT}, {ACT}, {IMP: 30.0, ACT: 30.0}) == 50_000


def test_read_through_is_the_least_read_input_without_the_lateness():
    """Early emission ends a hold at ``read_through``: an actions partition still behind holds it
    at its newest action (a backlog's negatives may not run ahead of their clicks); once that
    partition is read and quiet, the newest impression sets it; it never moves back."""
    clock = JoinWatermark(("hw.impressions", "hw.actions"), lateness_ms=5_000, idle_s=2.0)
    clock.delivered(IMP, 10.0)
    clock.impression(IMP, 60_000)
    clock.delivered(ACT, 10.0)
    clock.action(ACT, 21_000)
    assigned = {IMP, ACT}
    clock.update(assigned, {ACT}, {IMP: 10.5, ACT: 10.5})
    assert clock.read_through == 21_000 and clock.watermark == 16_000
    clock.action(ACT, 40_000)
    clock.update(assigned, set(), {IMP: 11.0, ACT: 11.0})  # read to its end, not quiet yet
    assert clock.read_through == 40_000
    clock.update(assigned, set(), {IMP: 13.0, ACT: 13.0})  # quiet for idle_s: idle
    assert clock.read_through == 60_000 and clock.watermark == 55_000
    clock.update(assigned, {ACT}, {IMP: 14.0, ACT: 14.0})
    assert clock.read_through == 60_000  # never back


def test_read_through_follows_a_producer_promise_without_adding_lateness():
    clock = JoinWatermark(("hw.impressions", "hw.actions"), lateness_ms=5_000, idle_s=2.0)
    clock.delivered(IMP, 10.0)
    clock.impression(IMP, 60_000)
    clock.delivered(ACT, 10.0)
    clock.promise(ACT, 30_000)
    clock.update({IMP, ACT}, {ACT}, {IMP: 10.5, ACT: 10.5})
    assert clock.read_through == 30_000

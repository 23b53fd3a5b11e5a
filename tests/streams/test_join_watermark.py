"""The joiner's watermark after a pause: a resumed partition is not idle until it has been quiet
for ``idle_s`` again, whatever the last fetch before the pause said of its end."""

from streams.join_watermark import JoinWatermark

IMP, ACT = ("hw.impressions", 0), ("hw.actions", 0)


def test_a_resumed_partition_holds_the_watermark_until_quiet_again():
    clock = JoinWatermark(("hw.impressions", "hw.actions"), lateness_ms=0, idle_s=2.0)
    assigned = {IMP, ACT}
    clock.delivered(IMP, 10.0)
    clock.impression(IMP, 60_000)
    clock.delivered(ACT, 11.0)
    clock.action(ACT, 50_000)
    assert clock.update(assigned, behind=set(), now=14.0) == 60_000  # both read and quiet
    clock.quiet_from(assigned, now=20.0)  # fetching resumes after a pause
    clock.delivered(IMP, 20.1)
    clock.impression(IMP, 120_000)
    # The actions partition's end is stale: it holds at what it had delivered (50_000, below
    # the watermark, which never moves back). Without the rule it would count as idle and
    # 120_000 would pass before its new actions are read.
    assert clock.update(assigned, behind=set(), now=20.5) == 60_000
    assert clock.update(assigned, behind=set(), now=22.6) == 120_000  # quiet for idle_s: idle

"""The generic batch former: priority, ageing (no starvation), deadlines, budget and chunking."""

from __future__ import annotations

from batching import BatchQueue, QueueItem, form_batch


def test_priority_then_deadline_then_arrival():
    q: BatchQueue[str] = BatchQueue(aging_s=1e9)
    q.push(QueueItem("late-low", "x", priority=1, arrival=0.0))
    q.push(QueueItem("new-high", "x", priority=0, arrival=5.0))
    q.push(QueueItem("old-high", "x", priority=0, arrival=1.0))
    q.push(QueueItem("urgent", "x", priority=0, arrival=9.0, deadline=10.0))
    assert [i.key for i in q.ordered(now=10.0)] == ["urgent", "old-high", "new-high", "late-low"]


def test_ageing_lets_old_low_priority_work_overtake_fresh_urgent_work():
    q: BatchQueue[str] = BatchQueue(aging_s=10.0)
    q.push(QueueItem("old-low", "x", priority=3, arrival=0.0))
    q.push(QueueItem("fresh-high", "x", priority=0, arrival=99.0))
    assert q.ordered(now=20.0)[0].key == "fresh-high"
    assert q.ordered(now=100.0)[0].key == "old-low"  # waited 100 s = 10 levels


def test_budget_chunking_and_head_of_line_stop():
    q: BatchQueue[int] = BatchQueue()
    for i, cost in enumerate([5, 30, 2]):
        q.push(QueueItem(i, cost, arrival=float(i)))
    got = form_batch(q, budget=20, max_items=8, admit=lambda it, rem: min(it.payload, rem), now=3.0)
    assert [(it.key, c) for it, c in got] == [(0, 5), (1, 15)]  # item 1 chunked, budget spent
    assert len(q) == 1
    q2: BatchQueue[int] = BatchQueue()
    q2.push(QueueItem("blocked", 1, arrival=0.0))
    q2.push(QueueItem("behind", 1, arrival=1.0))
    assert form_batch(q2, 10, 8, admit=lambda it, rem: 0) == [] and len(q2) == 2

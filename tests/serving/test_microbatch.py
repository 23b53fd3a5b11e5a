"""Micro-batching: shared forwards, the row budget, priorities, bounded queue, deadlines."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from serving.microbatch import BatchQueue, BatcherConfig, DeadlineExpired, MicroBatcher, Overloaded
from serving.pb import pb2
from serving.testing import random_model


def test_concurrent_submissions_share_forwards_and_get_their_own_results():
    sizes = []

    def forward(payloads):
        sizes.append(len(payloads))
        time.sleep(0.01)  # a forward takes a while, so others queue up behind it
        return [p * 2 for p in payloads]

    batcher = MicroBatcher(forward, BatcherConfig(max_batch_rows=1000, max_wait_ms=2, max_queue=100))
    try:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda i: batcher.submit(i, cost=1).result(timeout=10), range(64)))
    finally:
        batcher.close()
    assert results == [i * 2 for i in range(64)]
    assert sum(sizes) == 64 and len(sizes) < 64 / 4, sizes


def test_async_submissions_get_their_results_on_the_loop_one_wake_up_per_batch():
    calls = []

    def forward(payloads):
        time.sleep(0.01)
        return [p * 2 for p in payloads]

    batcher = MicroBatcher(forward, BatcherConfig(max_batch_rows=1000, max_wait_ms=2, max_queue=100))

    async def main():
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(cb, *args, **kw):
            calls.append(cb)
            return real(cb, *args, **kw)

        loop.call_soon_threadsafe = counting
        futs = [batcher.submit_async(i, cost=1) for i in range(40)]
        return await asyncio.gather(*futs)

    try:
        results = asyncio.run(main())
    finally:
        batcher.close()
    assert results == [i * 2 for i in range(40)]
    assert 1 <= len(calls) < 40 / 4, len(calls)  # one loop wake-up per batch, not per job


def test_a_cancelled_async_job_costs_no_compute():
    seen = []
    release = threading.Event()

    def forward(payloads):
        seen.extend(payloads)
        release.wait(5)
        return payloads

    batcher = MicroBatcher(forward, BatcherConfig(max_batch_rows=1, max_wait_ms=0, max_queue=10))

    async def main():
        first = batcher.submit_async("first", cost=1)
        await asyncio.sleep(0.05)  # "first" is being computed, blocking the worker
        dropped = batcher.submit_async("dropped", cost=1)
        dropped.cancel()
        release.set()
        assert await first == "first"
        after = await batcher.submit_async("after", cost=1)
        return after

    try:
        assert asyncio.run(main()) == "after"
    finally:
        batcher.close()
    assert seen == ["first", "after"]


def test_a_batch_never_exceeds_the_row_budget_unless_one_job_alone_does():
    q = BatchQueue(max_jobs=10)
    for cost in (300, 300, 300, 900, 50):
        q.submit(cost, cost=cost)
    batches = []
    while len(q):
        batch, _ = q.form_batch(budget=700)
        batches.append([j.cost for j in batch])
    assert batches == [[300, 300], [300], [900], [50]]


def test_lower_priority_value_is_served_first_then_arrival_order():
    q = BatchQueue(max_jobs=10)
    for name, prio in (("a", 1), ("b", 0), ("c", 1), ("d", 0)):
        q.submit(name, priority=prio)
    batch, _ = q.form_batch(budget=100)
    assert [j.payload for j in batch] == ["b", "d", "a", "c"]


def test_within_a_priority_the_earliest_deadline_goes_first():
    q = BatchQueue(max_jobs=10)
    now = time.monotonic()
    for name, dl in (("late", now + 60), ("none", float("inf")), ("soon", now + 5)):
        q.submit(name, deadline=dl)
    batch, expired = q.form_batch(budget=100, now=now)
    assert [j.payload for j in batch] == ["soon", "late", "none"] and expired == []


def test_a_full_queue_raises_overloaded_instead_of_growing():
    q = BatchQueue(max_jobs=3)
    for i in range(3):
        q.submit(i)
    with pytest.raises(Overloaded):
        q.submit(3)
    assert len(q) == 3


def test_jobs_whose_deadline_passed_are_dropped_without_compute():
    seen = []
    release = threading.Event()

    def forward(payloads):
        seen.extend(payloads)
        release.wait(5)
        return payloads

    batcher = MicroBatcher(forward, BatcherConfig(max_batch_rows=1, max_wait_ms=0, max_queue=10))
    try:
        first = batcher.submit("first", cost=1)
        time.sleep(0.05)  # "first" is now being computed, blocking the worker
        late = batcher.submit("late", cost=1, deadline=time.monotonic() + 0.01)
        time.sleep(0.05)
        release.set()
        assert first.result(timeout=5) == "first"
        with pytest.raises(DeadlineExpired):
            late.result(timeout=5)
        assert seen == ["first"]
    finally:
        batcher.close()


def _slow_model_server(start_server, **kw):
    model = random_model(items=100)
    server, stub = start_server(model, **kw)
    inner = server.service.forward_jobs

    def slow(jobs):
        time.sleep(0.2)
        return inner(jobs)

    server.batcher.forward = slow
    return server, stub


def test_overload_over_grpc_is_resource_exhausted(start_server):
    _, stub = _slow_model_server(start_server, max_queue=2, max_batch_rows=200)
    req = pb2.RecommendRequest(user_id=1, candidate_item_ids=list(range(200)))

    def call(_):
        try:
            stub.Recommend(req, timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()

    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(call, range(12)))
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1, codes
    assert codes.count(grpc.StatusCode.OK) >= 1, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_deadlines_are_honoured_over_grpc(start_server):
    _, stub = _slow_model_server(start_server)
    req = pb2.RecommendRequest(user_id=1, candidate_item_ids=list(range(10)))
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.Recommend(req, timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 0.19  # did not wait for the 200 ms forward
    assert len(stub.Recommend(req, timeout=5).items) == 10


def test_concurrent_grpc_calls_are_merged_into_fewer_forwards(start_server):
    model = random_model(items=1000)
    server, stub = start_server(model, max_wait_ms=5)
    forwards = []
    inner = server.service.forward_jobs

    def counting(jobs):
        forwards.append(len(jobs))
        time.sleep(0.005)
        return inner(jobs)

    server.batcher.forward = counting
    rng = np.random.default_rng(0)
    reqs = [pb2.RecommendRequest(user_id=i, candidate_item_ids=rng.choice(1000, 200, replace=False).tolist())
            for i in range(48)]
    with ThreadPoolExecutor(16) as pool:
        resps = list(pool.map(lambda r: stub.Recommend(r, timeout=10), reqs))
    assert all(len(r.items) == 200 for r in resps)
    assert sum(forwards) == 48 and max(forwards) > 1 and len(forwards) < 48, forwards


def test_a_lone_caller_is_dispatched_at_once_not_after_max_wait():
    # max_wait_ms is 30 s: a job that waited for company would miss its 5 s result timeout.
    # The previous batch had one job, so one queued job is all the company to expect.
    batcher = MicroBatcher(lambda ps: [p + 1 for p in ps], BatcherConfig(max_batch_rows=100, max_wait_ms=30_000))
    try:
        for i in range(3):
            assert batcher.submit(i, cost=1).result(timeout=5) == i + 1
    finally:
        batcher.close()


def test_jobs_are_dlrm_work_in_flight_at_the_arbiter_from_submit_until_delivered():
    from batching import Arbiter, Priority

    arbiter = Arbiter(aging_s=5.0)
    release = threading.Event()

    def forward(payloads):
        release.wait(5)
        if payloads == ["bad"]:
            raise ValueError("bad batch")
        return payloads

    batcher = MicroBatcher(forward, BatcherConfig(max_batch_rows=1, max_wait_ms=0, max_queue=10), arbiter=arbiter)
    try:
        first = batcher.submit("a", cost=1)
        queued = batcher.submit("b", cost=1)
        expired = batcher.submit("c", cost=1, deadline=time.monotonic())
        bad = batcher.submit("bad", cost=1)
        assert arbiter.in_flight(Priority.DLRM) == 4  # queued jobs count, not only the running forward
        release.set()
        assert first.result(5) == "a" and queued.result(5) == "b"
        with pytest.raises(DeadlineExpired):
            expired.result(5)
        with pytest.raises(ValueError):
            bad.result(5)
        deadline = time.monotonic() + 5
        while arbiter.in_flight(Priority.DLRM) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert arbiter.in_flight(Priority.DLRM) == 0  # every job left, whatever its end
    finally:
        batcher.close()

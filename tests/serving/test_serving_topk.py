"""Top-k selection: score descending, ties broken by the smaller item id, also at the k-th place."""

import numpy as np

from serving.pb import pb2
from serving.testing import random_model


def test_ties_at_the_cut_keep_the_smallest_ids(start_server):
    _, stub = start_server(random_model(items=100))
    # Unknown ids all read the slot's default vector, so they tie exactly.
    unknown = [10**12 + d for d in (9, 3, 7, 1, 5)]
    for batching in (True, False):
        _, stub = start_server(random_model(items=100), batching=batching)
        resp = stub.Recommend(pb2.RecommendRequest(user_id=1, candidate_item_ids=unknown + [4, 2], top_k=4))
        got = [(i.item_id, i.score) for i in resp.items]
        full = stub.Recommend(pb2.RecommendRequest(user_id=1, candidate_item_ids=unknown + [4, 2]))
        want = sorted(((i.item_id, i.score) for i in full.items), key=lambda t: (-t[1], t[0]))[:4]
        assert got == want
        tied = [i for i, s in got if i >= 10**12]
        assert tied == sorted(unknown)[:len(tied)]
        assert len(full.items) == 7 and np.all(np.diff([s for _, s in got]) <= 0)


def test_a_call_whose_deadline_passes_while_queued_costs_no_forward(start_server):
    import time

    import grpc
    import pytest

    server, stub = start_server(random_model(items=100))
    inner, rows = server.service.forward_jobs, []

    def slow(jobs):
        rows.append(sum(int(j.items.size) for j in jobs))
        time.sleep(0.3)
        return inner(jobs)

    server.batcher.forward = slow
    first = stub.Recommend.future(pb2.RecommendRequest(user_id=1, candidate_item_ids=[1, 2, 3]), timeout=5)
    time.sleep(0.05)  # the first call's forward is running: the next one queues behind it
    with pytest.raises(grpc.RpcError) as err:
        stub.Recommend(pb2.RecommendRequest(user_id=2, candidate_item_ids=list(range(40))), timeout=0.1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(first.result().items) == 3
    time.sleep(0.4)
    assert rows == [3]  # the expired call's 40 rows never reached a forward

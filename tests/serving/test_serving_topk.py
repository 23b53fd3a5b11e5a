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

"""Property test: the table behaves like a dict of id -> vector under random trains, reads,
updates and expiries (no id ever reads another id's row; live counts are exact)."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_store import EmbeddingTable, SlotConfig

# A small pool of adversarial ids: equal low 40 bits, negatives, extremes.
POOL = sorted({*(((i - 8) << 40) | 0xABCDE for i in range(16)), 0, -1, 2**63 - 1, -(2**63), 7, 8})
OPS = st.lists(
    st.tuples(st.sampled_from(["train", "update", "expire"]), st.lists(st.sampled_from(POOL), min_size=1, max_size=12)),
    min_size=1, max_size=20,
)


@settings(max_examples=40, deadline=None)
@given(OPS)
def test_table_matches_a_dict_model(ops):
    t = EmbeddingTable([SlotConfig("a", 3, optimizer="sgd", lr=1.0, init_std=1.0, ttl_s=5.0)])
    model: dict[int, torch.Tensor] = {}
    touched: dict[int, float] = {}
    now = 0.0
    for op, keys in ops:
        now += 1.0
        k = torch.tensor(keys, dtype=torch.int64)
        if op == "train":
            out = t.lookup("a", k, train=True, now=now)
            for i, key in enumerate(keys):
                if key not in model:
                    model[key] = out[i].clone()
                    touched[key] = now
                assert torch.equal(out[i], model[key])
        elif op == "update":
            g = torch.ones(len(keys), 3)
            t.apply_gradients("a", k, g, now=now)
            for key in set(keys):
                if key in model:
                    model[key] = model[key] - keys.count(key)  # SGD, lr 1, summed duplicates
                    touched[key] = now
        else:
            now += 3.0
            dropped = t.expire(now=now)
            stale = [key for key, ts in touched.items() if ts < now - 5.0]
            assert dropped == len(stale)
            for key in stale:
                del model[key], touched[key]
        assert t.stats()["a"]["live_rows"] == len(model)
        assert sorted(t.ids("a").tolist()) == sorted(model)
    if model:
        keys = sorted(model)
        got = t.lookup("a", torch.tensor(keys, dtype=torch.int64))
        torch.testing.assert_close(got, torch.stack([model[key] for key in keys]))
        rows = t._stores["a"].index.find(np.array(keys, dtype=np.int64))
        assert np.unique(rows).size == len(keys) and (rows > 0).all()

"""The dense tower, loss weighting, bag-gradient routing and the tower's wire form."""

import numpy as np
import pytest
import torch

from training.model import (DenseTower, ModelConfig, bag_grads_to_ids, tower_from_safetensors,
                            tower_to_safetensors, weighted_bce)


def _cfg(**kw):
    base = dict(slots=("user_id", "item_id", "cat"), embedding_dim=4, dense_dim=3, hidden=(8, 4))
    base.update(kw)
    return ModelConfig(**base)


def test_tower_maps_pooled_slots_and_dense_features_to_one_logit_per_row():
    tower = DenseTower(_cfg())
    out = tower(torch.randn(5, 3, 4), torch.randn(5, 3))
    assert out.shape == (5,)
    assert torch.isfinite(out).all()


def test_tower_rejects_dense_features_of_the_wrong_width():
    tower = DenseTower(_cfg())
    with pytest.raises(ValueError, match="dense features"):
        tower(torch.randn(5, 3, 4), torch.randn(5, 2))


@pytest.mark.parametrize("rank", [0, 2])
def test_full_and_low_rank_cross_layers_both_learn_a_pairwise_interaction(rank):
    # y = x_a * x_b is what cross layers exist for; an MLP-free tower must fit it.
    torch.manual_seed(0)
    tower = DenseTower(_cfg(slots=("a", "b"), embedding_dim=1, dense_dim=0, hidden=(),
                            cross_rank=rank, use_fm=False))
    opt = torch.optim.Adam(tower.parameters(), lr=0.05)
    x = torch.randn(512, 2, 1)
    y = (x[:, 0, 0] * x[:, 1, 0] > 0).float()
    for _ in range(300):
        opt.zero_grad()
        loss = weighted_bce(tower(x), y)
        loss.backward()
        opt.step()
    acc = ((tower(x) > 0).float() == y).float().mean()
    assert acc > 0.9


def test_bag_gradients_reach_every_pooled_id_sum_and_mean():
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    lengths = torch.tensor([2, 0, 1])
    assert torch.equal(bag_grads_to_ids(g, lengths, "sum"),
                       torch.tensor([[1.0, 2.0], [1.0, 2.0], [5.0, 6.0]]))
    assert torch.allclose(bag_grads_to_ids(g, lengths, "mean"),
                          torch.tensor([[0.5, 1.0], [0.5, 1.0], [5.0, 6.0]]))


def test_bag_gradients_match_autograd_through_embedding_bag():
    torch.manual_seed(1)
    weight = torch.randn(10, 3, requires_grad=True)
    ids = torch.tensor([1, 4, 4, 7, 2, 9])
    lengths = torch.tensor([3, 1, 2])
    offsets = torch.tensor([0, 3, 4])
    for mode in ("sum", "mean"):
        weight.grad = None
        pooled = torch.nn.functional.embedding_bag(ids, weight, offsets, mode=mode)
        upstream = torch.randn_like(pooled)
        (pooled * upstream).sum().backward()
        per_id = bag_grads_to_ids(upstream, lengths, mode)
        routed = torch.zeros_like(weight).index_add_(0, ids, per_id)
        assert torch.allclose(routed, weight.grad, atol=1e-6)


def test_weighted_bce_counts_a_downsampled_negative_as_one_over_its_rate():
    logits = torch.tensor([0.3, -1.0, 2.0])
    labels = torch.tensor([1.0, 0.0, 0.0])
    rate = torch.tensor([1.0, 0.25, 0.25])
    # Replicating each kept negative 4 times gives the same loss as weighting it by 4.
    rep_logits = torch.cat([logits[:1], logits[1:2].repeat(4), logits[2:3].repeat(4)])
    rep_labels = torch.cat([labels[:1], torch.zeros(8)])
    assert torch.allclose(weighted_bce(logits, labels, rate), weighted_bce(rep_logits, rep_labels))


def test_tower_round_trips_through_safetensors_with_its_config():
    tower = DenseTower(_cfg())
    data = tower_to_safetensors(tower, {"version": "7"})
    back, meta = tower_from_safetensors(data)
    assert back.cfg == tower.cfg and meta["version"] == "7"
    emb, dense = torch.randn(4, 3, 4), torch.randn(4, 3)
    with torch.no_grad():
        assert torch.equal(back(emb, dense), tower(emb, dense))


def test_garbage_tower_bytes_are_a_clear_error():
    with pytest.raises(ValueError, match="safetensors"):
        tower_from_safetensors(b"\x00" * 20)


def test_config_rejects_duplicate_slots():
    with pytest.raises(ValueError, match="duplicate"):
        DenseTower(ModelConfig(slots=("a", "a")))


def test_serving_can_import_the_model_and_the_params_protocol_without_the_training_loop():
    import subprocess
    import sys

    code = ("import sys, training.model, paramsync; "
            "print(sorted(m for m in ('kafka', 'streams', 'training.trainer', 'training.sync') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _fm_only(**kw):
    """A tower whose logit is its FM term alone (no MLP, cross net or dense part)."""
    tower = DenseTower(_cfg(dense_dim=0, hidden=(), cross_layers=0, **kw))
    with torch.no_grad():
        tower.head.weight.zero_()
        tower.head.bias.zero_()
    return tower


def test_pair_weights_start_as_plain_fm_and_can_turn_one_pair_off():
    from training.model.tower import PAIR_GAIN

    torch.manual_seed(2)
    emb = torch.randn(6, 3, 4)
    weighted, plain = _fm_only(), _fm_only(fm_pair_weights=False)
    e = emb.detach()
    every_pair = (e[:, 0] * e[:, 1] + e[:, 0] * e[:, 2] + e[:, 1] * e[:, 2]).sum(dim=1)
    with torch.no_grad():
        assert torch.allclose(weighted(emb), every_pair, atol=1e-5)
        assert torch.allclose(plain(emb), every_pair, atol=1e-5)
        # Pairs in slot order: (user_id, item_id), (user_id, cat), (item_id, cat).
        weighted.fm_pair[0] = -1.0 / PAIR_GAIN
        without_first = (e[:, 0] * e[:, 2] + e[:, 1] * e[:, 2]).sum(dim=1)
        assert torch.allclose(weighted(emb), without_first, atol=1e-5)


def test_pair_weights_learn_to_turn_down_a_noise_pair():
    # y depends on <a, b>; slot c is noise. FwFM must learn w(a,b) > w(a,c), w(b,c).
    torch.manual_seed(3)
    tower = _fm_only(slots=("a", "b", "c"))
    opt = torch.optim.Adam([tower.fm_pair], lr=1e-3)
    emb = torch.randn(2048, 3, 4) * 0.5
    y = ((emb[:, 0] * emb[:, 1]).sum(dim=1) > 0).float()
    for _ in range(200):
        opt.zero_grad()
        weighted_bce(tower(emb), y).backward()
        opt.step()
    w = tower.fm_pair.detach()
    assert w[0] > w[1] + 0.005 and w[0] > w[2] + 0.005


def test_a_config_written_before_pair_weights_loads_as_the_model_it_was():
    import json

    old = json.loads(_cfg().to_json())
    del old["fm_pair_weights"]
    cfg = ModelConfig.from_json(json.dumps(old))
    assert cfg.fm_pair_weights is False
    assert "fm_pair" not in DenseTower(cfg).state_dict()
    assert ModelConfig.from_json(_cfg().to_json()).fm_pair_weights is True

"""Triton kernels (run under TRITON_INTERPRET=1 on CPU) agree with the PyTorch reference."""

import pytest
import torch

from embedding_store import EmbeddingTable, SlotConfig, bag_grads_to_ids
from embedding_store.kernels import to_offsets
from embedding_store.kernels.reference import adagrad_update_reference, embedding_bag_reference
from embedding_store.kernels.triton_kernels import adagrad_update_triton, embedding_bag_triton


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_embedding_bag_matches_reference(mode, weighted):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(20, 5, generator=g)  # dim 5: exercises the masked tail of the block
    lengths = torch.tensor([3, 0, 1, 4])
    rows = torch.randint(0, 20, (8,), generator=g)
    rows[2] = -1  # unknown id reads the default vector
    offsets = to_offsets(8, lengths, None)
    w = torch.rand(8, generator=g) if weighted else None
    default = torch.full((5,), 0.25)
    ref = embedding_bag_reference(values, rows, offsets, mode, w, default)
    got = embedding_bag_triton(values, rows, offsets, mode, w, default)
    torch.testing.assert_close(got, ref)


def test_fused_adagrad_matches_reference():
    g = torch.Generator().manual_seed(1)
    values, accum = torch.randn(16, 6, generator=g), torch.rand(16, 6, generator=g)
    rows = torch.tensor([3, 0, 11, 7])
    grads = torch.randn(4, 6, generator=g)
    v2, a2 = values.clone(), accum.clone()
    adagrad_update_reference(values, accum, rows, grads, 0.1, 1e-10)
    adagrad_update_triton(v2, a2, rows, grads, 0.1, 1e-10)
    torch.testing.assert_close(v2, values)
    torch.testing.assert_close(a2, accum)


def test_bag_grads_to_ids_is_the_backward_of_bag_pooling():
    t = EmbeddingTable([SlotConfig("a", 3, init_std=1.0)])
    ids = torch.tensor([4, 5, 4, 6, 7], dtype=torch.int64)
    lengths = torch.tensor([2, 3])
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    leaf = t.lookup("a", ids, train=True).requires_grad_(True)
    offsets = to_offsets(5, lengths, None)
    pooled = embedding_bag_reference(leaf, torch.arange(5), offsets, "mean", w, None)
    upstream = torch.randn(2, 3)
    (pooled * upstream).sum().backward()
    torch.testing.assert_close(bag_grads_to_ids(upstream, lengths, "mean", w), leaf.grad)


def test_apply_bag_gradients_equals_expanding_then_applying():
    slots = [SlotConfig("a", 3, optimizer="sgd", lr=0.5, init_std=1.0)]
    t1, t2 = EmbeddingTable(slots), EmbeddingTable(slots)
    ids = torch.tensor([4, 5, 4, 6, 7], dtype=torch.int64)
    lengths = torch.tensor([2, 3])
    t1.lookup("a", ids, train=True)
    t2.lookup("a", ids, train=True)
    bag_grads = torch.randn(2, 3)
    t1.apply_bag_gradients("a", ids, lengths, bag_grads, mode="mean")
    t2.apply_gradients("a", ids, bag_grads_to_ids(bag_grads, lengths, "mean"))
    assert torch.equal(t1.lookup("a", ids), t2.lookup("a", ids))

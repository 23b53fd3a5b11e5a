"""Every sparse optimizer the trainer offers learns: FTRL-Proximal included (it used to stay at
AUC 0.5: its state wiped the rows' random start and its beta of 1 made every step tiny)."""

import pytest
import torch

from embedding_store import EmbeddingTable, SlotConfig
from streams.generator import GeneratorConfig
from training.config import TrainerConfig
from training.prequential import run_prequential


@pytest.mark.parametrize("optimizer", ["ftrl", "adagrad"])
def test_the_sparse_optimizer_learns_the_generator(optimizer):
    # Counters off: the AUC must come from rows the optimizer moved, not from counting.
    cfg = TrainerConfig(eval_window=5_000, publish=False, torch_threads=1, counters=False,
                        sparse_optimizer=optimizer)
    res = run_prequential(GeneratorConfig(seed=0), cfg, 40_000)
    assert res.stream.learner.auc_last_window > 0.75, res.to_dict()


def test_ftrl_keeps_a_rows_random_start_on_its_first_update():
    table = EmbeddingTable([SlotConfig("a", 4, optimizer="ftrl", init_std=0.1)], device="cpu", seed=0)
    ids = torch.tensor([7])
    before = table.lookup("a", ids, train=True).clone()
    table.apply_gradients("a", ids, torch.full((1, 4), 1e-4))
    after = table.lookup("a", ids)
    # One small step away from the start (about lr * sign(g)), not a reset to about 0.
    assert torch.allclose(after, before - 0.05, atol=1e-3), (before, after)

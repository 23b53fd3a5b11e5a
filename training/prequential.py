"""Learning check without a broker: synthetic world -> example batches -> Learner, test-then-train.

The same examples the joiner would put on ``hw.examples`` (:meth:`SyntheticStream.examples`), fed
straight to a :class:`~training.learner.Learner` in mini-batches, with the learner's prequential
evaluator scoring every batch before the update. It answers "can our model learn this world in N
events, and how close does it get to the ground truth?" in seconds, which is what tuning the model
and the world needs; ``headwater demo`` then confirms it through Kafka and the joiner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from streams.events import ExampleBatch
from streams.generator import GeneratorConfig, SyntheticStream
from training.config import TrainerConfig
from training.learner import Learner

__all__ = ["LearningResult", "run_prequential"]


@dataclass
class LearningResult:
    """What a prequential run reached: the last full window's AUCs and the whole run's."""

    events: int
    examples: int
    auc_last_window: float
    auc_truth_last_window: float
    auc_overall: float
    auc_truth_overall: float
    seconds: float
    window_gaps: list[float]  # truth AUC - learner AUC per finished window, oldest first

    @property
    def auc_gap(self) -> float:
        """How far the learner's last window is below the ground truth on the same examples."""
        return self.auc_truth_last_window - self.auc_last_window

    def to_dict(self) -> dict:
        return {"events": self.events, "examples": self.examples,
                "auc_last_window": round(self.auc_last_window, 4),
                "auc_truth_last_window": round(self.auc_truth_last_window, 4),
                "auc_gap": round(self.auc_gap, 4), "auc_overall": round(self.auc_overall, 4),
                "auc_truth_overall": round(self.auc_truth_overall, 4),
                "seconds": round(self.seconds, 2)}


def run_prequential(world: GeneratorConfig, cfg: TrainerConfig, events: int,
                    block_requests: int = 256,
                    on_progress: Callable[[int], None] | None = None) -> LearningResult:
    """Streams ``events`` events of ``world`` (shown items + clicks) through a fresh learner."""
    stream = SyntheticStream(world)
    threads = torch.get_num_threads()
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    try:
        return _run(stream, cfg, events, block_requests, on_progress)
    finally:
        torch.set_num_threads(threads)


def _run(stream: SyntheticStream, cfg: TrainerConfig, events: int, block_requests: int,
         on_progress: Callable[[int], None] | None) -> LearningResult:
    learner: Learner | None = None
    pending: list[ExampleBatch] = []
    pending_rows = 0
    seen = 0
    t0 = time.perf_counter()

    def train(batch: ExampleBatch) -> None:
        nonlocal learner
        if learner is None:
            learner = Learner.for_batch(cfg, batch)
        learner.train(batch)

    while seen < events:
        block = stream.block(block_requests)
        seen += stream.count_events(block)
        pending.append(stream.examples(block))
        pending_rows += len(pending[-1])
        if pending_rows >= cfg.batch_size:
            batch = ExampleBatch.concat(pending)
            for start in range(0, len(batch) - cfg.batch_size + 1, cfg.batch_size):
                train(batch.take(np.arange(start, start + cfg.batch_size)))
            rest = len(batch) % cfg.batch_size
            pending = [batch.take(np.arange(len(batch) - rest, len(batch)))] if rest else []
            pending_rows = rest
        if on_progress is not None:
            on_progress(seen)
    if pending_rows:
        train(ExampleBatch.concat(pending))
    assert learner is not None
    ev = learner.evaluator
    last = ev.windows[-1] if ev.windows else ev.window.result(0)
    overall = ev.overall.result(-1)
    return LearningResult(seen, learner.examples_trained, last.auc, last.truth_auc, overall.auc,
                          overall.truth_auc, time.perf_counter() - t0,
                          [w.truth_auc - w.auc for w in ev.windows])

"""The embedding check's product path: the trainer's ``Learner`` and the serving replica built with
``device=<the run's device>``, against both built with ``device="cpu"``.

Both learners train the same batches (multi-id bags, dense features; counters off, so the table's
updates take the fused Adagrad kernel, not the reference update counter columns need). The device
learner publishes through a real ``DeltaPublisher`` into memory (:class:`RecordingProducer`); a
replica on the device and one on the CPU apply the same ``hw.params`` messages (a snapshot, then a
live sparse and dense update) and score the same rows the ``Score`` way (:func:`score_examples`)
and the ``Recommend`` way (:func:`score_jobs`).

Without CUDA the device side is the CPU inside ``embedding_store.kernels.triton_on_cpu()``: the
trainer's table reads and updates run the Triton kernels under the interpreter. Serving's CPU read
is one TorchScript call that meets no kernel, so there both sides run the same code: the figures
then prove the replica's plumbing, not a device.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from bench.gpu_check.common import Setup

__all__ = ["RecordingProducer", "check_product", "kernels_on"]

# Rows per batch: few, because without CUDA the interpreter runs one Python program per bag and
# per updated row; a plumbing check needs no more on a GPU either.
ROWS = 16


def kernels_on(setup: Setup) -> AbstractContextManager:
    """What sends the device side's tables through the Triton kernels: nothing on CUDA (they do),
    the interpreter on CPU tensors otherwise."""
    if setup.cuda:
        return nullcontext()
    from embedding_store.kernels import triton_on_cpu

    return triton_on_cpu()


@dataclasses.dataclass
class _Sent:
    offset: int

    def get(self, timeout: float | None = None) -> "_Sent":
        return self


class RecordingProducer:
    """The ``KafkaProducer`` calls a ``DeltaPublisher`` makes, keeping the decoded messages in
    ``sent``: a replica can apply them without a broker."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, topic: str, value: bytes, key: bytes | None = None, partition: int = 0) -> _Sent:
        from paramsync import decode_params

        self.sent.append(decode_params(value))
        return _Sent(len(self.sent) - 1)

    def flush(self, timeout: float | None = None) -> None:
        pass

    def partitions_for(self, topic: str) -> set[int]:
        return {0}


def _batches(seed: int, n_batches: int, rows: int, dense_dim: int) -> list:
    """Synthetic batches with dense features and a ``tags`` slot of 0-3 ids a row (pooled bags)."""
    from streams.events import Ragged
    from training.synthetic import synthetic_examples

    rng = np.random.default_rng(seed)
    out = []
    for b in synthetic_examples(n_batches * rows, rows, slots=3, vocab=200, seed=seed):
        lengths = rng.integers(0, 4, len(b)).astype(np.int32)
        tags = Ragged(rng.integers(0, 50, int(lengths.sum())).astype(np.int64), lengths)
        out.append(dataclasses.replace(b, sparse={**b.sparse, "tags": tags},
                                       dense=rng.standard_normal((len(b), dense_dim)).astype(np.float32)))
    return out


def _logits(learner: Any, batch: Any) -> torch.Tensor:
    """The learner's logits of ``batch`` (no training), on the host."""
    from training.model import lookup_slots

    bags = lookup_slots(learner.table, learner.model_cfg.slots, batch.sparse, len(batch),
                        learner.model_cfg.slot_poolings())
    with torch.no_grad():
        return learner.logits(bags.emb, torch.from_numpy(batch.dense).to(learner.device)).cpu()


def _rows(table: Any) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
    """Every slot's live ids (sorted) and their rows, on the host."""
    out = {}
    for slot, sd in table.export_delta(0).slots.items():
        order = np.argsort(sd.ids)
        out[slot] = (sd.ids[order], sd.values[torch.from_numpy(order)])
    return out


def _rows_diff(a: Any, b: Any, shift: float) -> float:
    ra, rb = _rows(a), _rows(b)
    if ra.keys() != rb.keys() or any(not np.array_equal(ra[s][0], rb[s][0]) for s in ra):
        return float("inf")  # not the same ids: no row figure means anything
    return max(float((ra[s][1] - rb[s][1] - shift).abs().max()) for s in ra)


def _scores(replica: Any, batch: Any) -> tuple[np.ndarray, np.ndarray]:
    """(Score, Recommend) probabilities of ``batch``'s rows from ``replica``: explicit rows, and
    one ranking job per 4 rows (its first row's user and context, its rows' items)."""
    from serving.calibration import Calibrator
    from serving.scoring import ExampleRows, RankJob, ServingModel, score_examples, score_jobs

    model = ServingModel("ctr", replica.table, replica.tower, int(replica.version), int(replica.watermark_ms))
    rows = ExampleRows(len(batch), {s: (r.values, r.lengths.astype(np.int64)) for s, r in batch.sparse.items()},
                       batch.dense)
    explicit = score_examples(model, rows, Calibrator())
    jobs = []
    for start in range(0, len(batch), 4):
        first = batch.take(np.array([start]))
        jobs.append(RankJob(int(first.user_id[0]), batch.item_id[start:start + 4].astype(np.int64),
                            {s: first.sparse[s].values for s in ("f00", "tags")}, first.dense[0]))
    return explicit, np.concatenate(score_jobs(model, jobs, Calibrator()))


def check_product(setup: Setup) -> dict:
    """The figures of the product path (see the module docstring); ``errors`` lists what could
    not be compared or sat on the wrong device."""
    from serving.replica import ModelReplica
    from training.config import TrainerConfig
    from training.learner import Learner
    from training.model import tower_to_safetensors
    from training.sync import DeltaPublisher, SyncConfig

    cfg = TrainerConfig(batch_size=ROWS, hidden=(32, 16), embedding_dim=16, counters=False,
                        dense_precision="fp32", eval_window=1_000, seed=setup.seed)
    *train, held = _batches(setup.seed, 4, ROWS, dense_dim=4)
    shift = 1.0 if setup.perturb else 0.0
    errors: list[str] = []
    dev_cfg = dataclasses.replace(cfg, device=str(setup.device))
    learners = {"device": Learner.for_batch(dev_cfg, train[0]), "cpu": Learner.for_batch(cfg, train[0])}
    producer = RecordingProducer()
    dev = learners["device"]
    publisher = DeltaPublisher(producer, "hw.params", dev.table, lambda: tower_to_safetensors(dev.tower),
                               SyncConfig(model_id=cfg.model_id))
    for i, batch in enumerate(train):
        if i == len(train) - 1:  # a snapshot first, the last batch then goes out as live updates
            publisher.publish_snapshot(watermark_ms=1_000)
        with kernels_on(setup):
            dev.train(batch)
        learners["cpu"].train(batch)
    publisher.publish_sparse(watermark_ms=2_000)
    publisher.publish_dense(watermark_ms=2_000)
    with kernels_on(setup):
        dev_logits = _logits(dev, held)
    trainer = {
        "logits_max_abs_diff": float((dev_logits - _logits(learners["cpu"], held) - shift).abs().max()),
        "rows_max_abs_diff": _rows_diff(dev.table, learners["cpu"].table, shift),
        "logloss": {k: round(ln.evaluator.overall.learner.logloss(), 6) for k, ln in learners.items()},
        "table_on": str(dev.table.device), "tower_on": str(next(dev.tower.parameters()).device),
    }
    replicas = {"device": ModelReplica(cfg.model_id, device=str(setup.device)), "cpu": ModelReplica(cfg.model_id)}
    for msg in producer.sent:
        for r in replicas.values():
            r.apply(msg)
    serving: dict[str, Any] = {
        "messages": len(producer.sent), "version": int(replicas["device"].version),
        "rows_vs_trainer_max_abs_diff": _rows_diff(replicas["device"].table, dev.table, shift),
        "table_on": str(replicas["device"].table.device),
        "tower_on": str(next(replicas["device"].tower.parameters()).device),
    }
    want = _scores(replicas["cpu"], held)
    try:
        with kernels_on(setup):
            got = _scores(replicas["device"], held)
        serving["score_max_abs_diff"] = float(np.abs(got[0] - want[0] - shift).max())
        serving["recommend_max_abs_diff"] = float(np.abs(got[1] - want[1] - shift).max())
    except RuntimeError as exc:  # a device mismatch left in serving's scoring: say where
        errors.append(f"serving scores on {setup.device}: {type(exc).__name__}: {exc}")
    for where, figures in (("trainer", trainer), ("serving", serving)):
        for key in ("table_on", "tower_on"):
            if torch.device(figures[key]).type != setup.device.type:
                errors.append(f"{where} {key[:-3]} on {figures[key]}, not {setup.device}")
    diffs = [v for f in (trainer, serving) for k, v in f.items() if k.endswith("max_abs_diff")]
    return {"batches": len(train), "rows_per_batch": ROWS, "slots": list(dev.model_cfg.slots), "dense_dim": 4,
            "device_side": str(setup.device) if setup.cuda else "cpu, Triton kernels under the interpreter",
            "trainer": trainer, "serving": serving, "max_abs_diff": max(diffs), "errors": errors}

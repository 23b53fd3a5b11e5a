"""Helpers for the serving tests: the trainer's side of hw.params, and polling."""

import time

import numpy as np
import torch
from kafka import KafkaProducer

from embedding_store import EmbeddingTable, SlotConfig
from streams.broker import free_port as _free_port  # noqa: F401 (tests import it from here)
from streams.kafka_io import topic_names
from training.model import DenseTower, ModelConfig, tower_to_safetensors
from training.sync import DeltaPublisher, SyncConfig

SLOTS = ("user_id", "item_id")


class Trainer:
    """The trainer's side of hw.params: a real table + tower published by the real DeltaPublisher."""

    def __init__(self, kafka, seed=0):
        torch.manual_seed(seed)
        self.tower = DenseTower(ModelConfig(slots=SLOTS, embedding_dim=8, hidden=(16,))).eval()
        self.table = EmbeddingTable([SlotConfig(name=s, dim=8) for s in SLOTS], seed=seed)
        self.producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all", linger_ms=0)
        self.topic = topic_names(kafka.topic_prefix).params
        self.pub = DeltaPublisher(self.producer, self.topic, self.table,
                                  lambda: tower_to_safetensors(self.tower), SyncConfig(model_id="ctr"))

    def train(self, slot, ids, scale=0.1):
        ids = torch.as_tensor(ids, dtype=torch.int64)
        self.table.lookup(slot, ids, train=True)  # admits the rows
        grads = torch.full((ids.numel(), 8), scale)
        self.table.apply_gradients(slot, ids, grads)

    def close(self):
        self.producer.close()


def _wait(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _same_rows(a, b, slot, ids):
    t = torch.as_tensor(ids, dtype=torch.int64)
    return torch.equal(a.lookup(slot, t), b.lookup(slot, t))


def run_trainer_on(kafka, cfg, batches):
    """An ``OnlineTrainer`` that has joined its group, ``batches`` on ``hw.examples``, and the
    thread running it (it exits ``cfg.idle_exit_s`` after the last one): (trainer, thread)."""
    import threading

    from streams.events import encode_examples
    from streams.kafka_producer import BatchProducer
    from training.trainer import OnlineTrainer

    trainer = OnlineTrainer(cfg, kafka)
    while not trainer.consumer.assignment():
        trainer.step()
    producer = BatchProducer(kafka)
    for b in batches:
        producer.send(topic_names(kafka.topic_prefix).examples, encode_examples(b))
    producer.flush()
    producer.close()
    runner = threading.Thread(target=trainer.run)
    runner.start()
    return trainer, runner

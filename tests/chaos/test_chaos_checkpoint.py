"""The trainer killed during a checkpoint write (``headwater bench chaos``'s ``trainer-checkpoint``
fault): a checkpoint's table lives in a directory of its own and counts only once its manifest
names it, so a kill -9 between the table and the manifest leaves the last complete checkpoint,
whose table, de-dup filter and offsets are one cut, and nothing is trained twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch

from embedding_store import EmbeddingTable, SlotConfig
from headwater.chaos import ChaosConfig, run_chaos
from headwater.chaos.accounting import trained_lineage
from streams.events import encode_examples
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer
from training.checkpoint import CheckpointStore
from training.synthetic import synthetic_examples


class _Killed(BaseException):
    """Stands for the SIGKILL: nothing after it in the write runs."""


def _trained(table: EmbeddingTable, ids, scale: float) -> None:
    ids = torch.as_tensor(ids, dtype=torch.int64)
    table.lookup("item_id", ids, train=True)
    table.apply_gradients("item_id", ids, torch.full((ids.numel(), 4), scale))


def _rows(table: EmbeddingTable) -> torch.Tensor:
    return table.lookup("item_id", torch.arange(100))


def _write(store, table, offset):
    return store.write(table, {"w": torch.ones(1)}, {}, {("hw.examples", 0): offset}, int(table.version))


def test_a_checkpoint_killed_between_its_table_and_its_manifest_is_never_read(tmp_path, monkeypatch):
    table = EmbeddingTable([SlotConfig(name="item_id", dim=4)])
    _trained(table, range(50), 0.5)
    store = CheckpointStore(tmp_path)
    first = _write(store, table, 10)
    at_first = _rows(table).clone()
    _trained(table, range(25, 100), -1.0)  # trained past the checkpoint's offsets

    save = CheckpointStore._save_table

    def save_then_die(self, *args):
        save(self, *args)
        raise _Killed  # the table is durable; the state file and manifest never come

    monkeypatch.setattr(CheckpointStore, "_save_table", save_then_die)
    with pytest.raises(_Killed):
        _write(store, table, 20)
    monkeypatch.undo()
    assert (tmp_path / "tables" / "00000002").is_dir()  # the half-written checkpoint's table

    restarted = CheckpointStore(tmp_path)
    m = restarted.latest()
    assert m == first and m.offsets_by_partition() == {("hw.examples", 0): 10}
    loaded = EmbeddingTable.load(str(restarted.table_path_of(m)))
    assert int(loaded.version) == m.table_version  # the table of those offsets, not ahead of them
    assert torch.equal(_rows(loaded), at_first)

    # Training on from there: the next checkpoint replaces the orphan, and only two are kept.
    _trained(loaded, range(60), 0.25)
    second = _write(restarted, loaded, 20)
    third = _write(restarted, loaded, 30)
    assert (second.seq, third.seq) == (2, 3)
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == ["00000002", "00000003"]
    again = EmbeddingTable.load(str(restarted.table_path_of(restarted.latest())))
    assert torch.equal(_rows(again), _rows(loaded))


def test_each_checkpoint_copies_the_previous_table_and_writes_only_what_changed(tmp_path):
    table = EmbeddingTable([SlotConfig(name="item_id", dim=4)])
    _trained(table, range(10_000), 0.5)
    store = CheckpointStore(tmp_path)
    first = _write(store, table, 1)
    before = _rows(table).clone()
    _trained(table, [3], 1.0)
    second = _write(store, table, 2)
    a, b = (tmp_path / first.table_dir, tmp_path / second.table_dir)
    assert a != b
    shared = {p.name for p in a.glob("*.sst")} & {p.name for p in b.glob("*.sst")}
    assert shared and all(os.path.samefile(a / n, b / n) for n in shared)  # hard links, not copies
    assert torch.equal(_rows(EmbeddingTable.load(str(a))), before)  # the older checkpoint is intact
    assert torch.equal(_rows(EmbeddingTable.load(str(b))), _rows(table))


def _train_cmd(kafka, ckpt, head):
    return head + ["train", "--json", "--bootstrap-servers", kafka.bootstrap_servers,
                   "--topic-prefix", kafka.topic_prefix, "--group-id", f"ck-{uuid.uuid4().hex[:6]}",
                   "--checkpoint-dir", str(ckpt), "--checkpoint-interval-s", "0.3", "--no-publish",
                   "--batch-size", "250", "--hidden", "16,8", "--max-batch-wait-ms", "50",
                   "--torch-threads", "1", "--idle-exit-s", "3"]


def test_a_trainer_killed_9_inside_a_checkpoint_write_resumes_and_trains_each_example_once(
        kafka_topics, tmp_path):
    """A real trainer process, killed by the chaos tool's kill point inside a checkpoint write."""
    n = 4_000
    batches = synthetic_examples(n, 250, slots=3, vocab=300, seed=7)
    producer = BatchProducer(kafka_topics)
    for b in batches:
        producer.send(topic_names(kafka_topics.topic_prefix).examples, encode_examples(b))
    producer.close()
    ckpt, note = tmp_path / "ckpt", tmp_path / "note.json"
    cmd = _train_cmd(kafka_topics, ckpt, [sys.executable, "-m", "headwater.chaos.killpoint", str(note)])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "t.log", "ab"))
    store = CheckpointStore(ckpt)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((m := store.latest()) is not None and m.examples_trained >= n // 4):
        assert proc.poll() is None, (tmp_path / "t.log").read_text()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)  # arm: the next checkpoint write dies after its table
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed = json.loads(note.read_text())
    resumed = store.latest()
    assert resumed.seq == killed["seq"] - 1 and (ckpt / killed["table_dir"]).is_dir()
    assert killed["examples_trained"] > resumed.examples_trained  # the orphan table is ahead
    assert store.table_path_of(resumed) != ckpt / killed["table_dir"]

    # A fresh group (no wait for the dead member's session to expire): the manifest's offsets,
    # not the group's, say where training resumes.
    again = _train_cmd(kafka_topics, ckpt, [sys.executable, "-m", "headwater"])
    done = subprocess.run(again, capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    summary = json.loads(done.stdout.decode().strip().splitlines()[-1])
    lineage = trained_lineage(ckpt)
    assert summary["examples_trained"] == lineage.examples_trained == n
    assert lineage.duplicates_trained == 0 and lineage.forgotten == 0
    assert np.isin(np.concatenate([b.example_id for b in batches]), lineage.ids).all()


@pytest.mark.slow  # the whole chaos cluster (broker, generator, joiner, trainer, 2 replicas): ~90 s
def test_the_chaos_run_kills_the_trainer_inside_a_checkpoint_write_and_nothing_is_trained_twice(tmp_path):
    report = run_chaos(ChaosConfig(faults="trainer-checkpoint", storage="memory", data_dir=str(tmp_path),
                                   warmup_s=1.0, settle_s=1.0, load_qps=10.0))
    (fault,) = report["faults"]
    assert report["faults_survived"] == 1, fault
    assert fault["detail"]["kill_landed_mid_write"] and fault["detail"]["exit"] == -signal.SIGKILL
    assert fault["detail"]["resumed_from_checkpoint"] == fault["detail"]["killed_in_checkpoint"] - 1
    assert fault["detail"]["rows_retrained"] == 0
    assert fault["duplicates_trained"] == 0 and fault["lost"] == 0 and fault["failed_calls"] == 0
    assert report["lost"] == 0 and report["duplicates_trained"] == 0 and report["serving"]["errors"] == 0

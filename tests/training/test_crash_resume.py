"""kill -9 the trainer mid-stream, restart it: every example trained, AUC as if never killed."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np

from streams.events import encode_examples
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer
from training.checkpoint import CheckpointStore
from training.config import TrainerConfig
from training.synthetic import synthetic_examples
from training.trainer import OnlineTrainer

N, ROWS = 40_000, 500
MODEL = dict(batch_size=500, hidden=(16, 8), dense_lr=3e-3, max_batch_wait_ms=50)


def _feed(kafka, messages, gap_s, killed: threading.Event | None = None):
    """Feeds the first half, holds until the kill has landed, then feeds the rest.

    The hold makes "mid-stream" a fact rather than a race: on a loaded machine the trainer's
    start-up alone can outlast an unpaced feed.
    """
    producer = BatchProducer(kafka)
    topic = topic_names(kafka.topic_prefix).examples
    for i, m in enumerate(messages):
        if killed is not None and i == len(messages) // 2:
            killed.wait(timeout=180)
        producer.send(topic, m)
        producer.flush()
        time.sleep(gap_s)
    producer.close()


def _trainer_cmd(kafka, group, ckpt):
    return [sys.executable, "-m", "headwater", "--log-level", "WARNING", "train", "--json",
            "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix,
            "--group-id", group, "--checkpoint-dir", str(ckpt), "--checkpoint-interval-s", "0.5",
            "--idle-exit-s", "6", "--no-publish", "--batch-size", str(MODEL["batch_size"]),
            "--hidden", "16,8", "--dense-lr", str(MODEL["dense_lr"]), "--max-batch-wait-ms", "50"]


def test_kill_9_mid_stream_then_restart_trains_every_example_once_with_the_same_auc(kafka_topics, tmp_path):
    batches = synthetic_examples(N, ROWS, slots=3, vocab=300, seed=11)
    messages = [encode_examples(b) for b in batches]
    ckpt = tmp_path / "ckpt"
    group = f"crash-{uuid.uuid4().hex[:6]}"

    proc = subprocess.Popen(_trainer_cmd(kafka_topics, group, ckpt), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    killed = threading.Event()
    feeder = threading.Thread(target=_feed, args=(kafka_topics, messages, 0.1, killed), daemon=True)
    feeder.start()
    store = CheckpointStore(ckpt)
    deadline = time.monotonic() + 90
    at_kill = None
    while time.monotonic() < deadline:
        m = store.latest()
        if m is not None and m.examples_trained >= N // 5:
            at_kill = m
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    assert at_kill is not None, "trainer never checkpointed a fifth of the stream"
    assert feeder.is_alive(), "the kill must land mid-stream, while examples still arrive"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    killed.set()

    restarted = subprocess.run(_trainer_cmd(kafka_topics, group, ckpt), capture_output=True,
                               timeout=180)
    feeder.join()
    assert restarted.returncode == 0, restarted.stderr.decode()[-2000:]
    summary = json.loads(restarted.stdout.decode().strip().splitlines()[-1])

    # Every example is in the lineage of the final state exactly once: the checkpoint covered
    # what was trained before it; what the killed process trained after it was replayed.
    assert summary["examples_trained"] == N
    final = store.latest()
    assert final.seq > at_kill.seq and final.offsets[f"{topic_names(kafka_topics.topic_prefix).examples}:0"] == len(messages)
    tensors, _ = store.load_state(final)
    seen = np.concatenate([t.numpy() for k, t in tensors.items() if k.startswith("dedup.")])
    assert np.isin(np.concatenate([b.example_id for b in batches]), seen).all()

    # The same stream, never interrupted, in a fresh group: the AUC lands in the same band.
    ref = OnlineTrainer(TrainerConfig(group_id=f"ref-{uuid.uuid4().hex[:6]}", idle_exit_s=10,
                                      publish=False, **MODEL), kafka_topics).run()
    assert ref["examples_trained"] == N
    auc, ref_auc = summary["eval"]["overall"]["auc"], ref["eval"]["overall"]["auc"]
    assert abs(auc - ref_auc) < 0.02, (auc, ref_auc)
    assert auc > summary["eval"]["overall"]["truth_auc"] - 0.1


def test_sigterm_stops_the_trainer_cleanly_with_a_final_checkpoint(kafka_topics, tmp_path):
    batches = synthetic_examples(5000, ROWS, slots=3, vocab=300, seed=12)
    ckpt = tmp_path / "ckpt"
    cmd = _trainer_cmd(kafka_topics, f"term-{uuid.uuid4().hex[:6]}", ckpt)
    cmd[cmd.index("--idle-exit-s") + 1] = "0"  # run until told to stop
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _feed(kafka_topics, [encode_examples(b) for b in batches], 0.0)
    store = CheckpointStore(ckpt)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        m = store.latest()
        if m is not None and m.examples_trained == 5000:
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    before = store.latest().seq
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["examples_trained"] == 5000
    final = store.latest()
    assert final.seq > before, "the stop path writes a last checkpoint"
    assert final.offsets == {f"{topic_names(kafka_topics.topic_prefix).examples}:0": len(batches)}

"""``headwater serve --llm``: one process serves Recommend with the rerank, /v1/rank and the history."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import httpx
import numpy as np
from kafka import KafkaProducer

from serving.pb import pb2, pb2_grpc
from streams.broker import free_port
from streams.events import Action, encode_actions
from streams.kafka_io import topic_names
from tests.rerank.rerank_helpers import item_text
from tests.serving.serving_helpers import Trainer


def test_serve_with_llm_reranks_from_live_history_and_serves_http(kafka_topics, llm_dir, tmp_path):
    catalog = tmp_path / "items.csv"
    catalog.write_text("item_id,title\n" + "".join(f"{i},{item_text(i)}\n" for i in range(20)) + ",no id\n")
    producer = KafkaProducer(bootstrap_servers=kafka_topics.bootstrap_servers)
    now = int(time.time() * 1000)
    producer.send(topic_names(kafka_topics.topic_prefix).actions,
                  encode_actions([Action(f"r{k}", 5, k, "click", 1.0, now + k) for k in range(8)]))
    producer.flush()
    producer.close()
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "headwater", "serve", "--bootstrap-servers", kafka_topics.bootstrap_servers,
         "--topic-prefix", kafka_topics.topic_prefix, "--port", str(port), "--state-dir", str(tmp_path / "ps"),
         "--metrics-port", str(metrics_port), "--llm", str(llm_dir), "--llm-port", str(http_port),
         "--item-text", str(catalog), "--item-text-cols", "title", "--rerank-top-n", "6",
         "--rerank-deadline-ms", "20000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    trainer = Trainer(kafka_topics)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        trainer.train("item_id", np.arange(20))
        trainer.pub.publish_snapshot(watermark_ms=now)
        stub = pb2_grpc.RecommenderStub(channel)
        deadline, resp = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            try:
                resp = stub.Recommend(pb2.RecommendRequest(user_id=5, candidate_item_ids=list(range(20)), top_k=10),
                                      timeout=30)
                if resp.reranked:
                    break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc  # no model yet
            time.sleep(0.2)
        assert resp is not None and resp.reranked == 6 and not resp.degraded
        assert all(it.HasField("llm_score") for it in resp.items[:6])
        # the LLM's own endpoint, from the same process and the same engine
        rank = httpx.post(f"http://127.0.0.1:{http_port}/v1/rank", timeout=60,
                          json={"context": "a user who likes robots", "candidates": ["robots film", "titanic film"]})
        assert rank.status_code == 200 and len(rank.json()["scores"]) == 2
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert "hw_serve_rerank_calls_total" in metrics and "hw_serve_history_users" in metrics
        # the history came from hw.actions: the prompt holds user 5's clicked items
        assert 'hw_serve_history_events_total 8.0' in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-3000:]
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        trainer.close()

"""End to end over the real broker: the online trainer publishes, serving replicates and answers."""

import uuid

import grpc
import numpy as np
from serving_helpers import _wait, run_trainer_on

from serving.config import ServeConfig
from serving.param_server import ParamServer, ParamServerConfig
from serving.pb import pb2, pb2_grpc
from serving.server import RecommendServer
from streams.kafka_io import topic_names
from training.config import TrainerConfig
from training.model import score as model_score
from training.synthetic import synthetic_examples


def test_served_probabilities_are_the_trainers_and_match_the_click_rate(kafka_topics):
    batches = synthetic_examples(8000, 400, slots=3, vocab=300, seed=7)
    cfg = TrainerConfig(group_id=f"t-{uuid.uuid4().hex[:8]}", batch_size=400, hidden=(32, 16),
                        idle_exit_s=2.0, max_batch_wait_ms=50, sparse_sync_interval_s=0.2,
                        dense_sync_interval_s=0.5, checkpoint_interval_s=1e9)
    trainer, runner = run_trainer_on(kafka_topics, cfg, batches)

    ps = ParamServer(ParamServerConfig(poll_timeout_ms=50), kafka_topics.bootstrap_servers,
                     topic_names(kafka_topics.topic_prefix).params)
    server = RecommendServer(ServeConfig(port=0, precision="float32"), ps).start()
    ps.start()
    try:
        runner.join(timeout=120)
        assert not runner.is_alive()
        learner = trainer.learner
        assert _wait(lambda: ps.ready and ps.state.version == trainer.publisher.published_version, 30)
        assert _wait(lambda: all((a == b).all() for a, b in zip(
            ps.state.tower.state_dict().values(), learner.tower.state_dict().values())), 30)

        # Score the last 400 examples through gRPC: exactly what the trainer's model says.
        last = batches[-1]
        stub = pb2_grpc.RecommenderStub(grpc.insecure_channel(server.address))
        examples = [pb2.Example(sparse=[pb2.SparseFeature(slot=s, ids=[int(last.sparse[s].values[i])])
                                        for s in last.sparse]) for i in range(len(last))]
        served = np.array(stub.Score(pb2.ScoreRequest(examples=examples)).probabilities)
        want = model_score(learner.table, learner.tower, last.sparse, None, len(last)).numpy()
        np.testing.assert_allclose(served, want, rtol=1e-4, atol=1e-6)

        # A served probability means what it says: over all examples, the mean predicted
        # probability matches the observed click rate, and it tracks the hidden truth.
        allp, labels, truth = [], [], []
        for b in batches[-10:]:
            allp.append(model_score(ps.current().table, ps.current().tower, b.sparse, None, len(b)).numpy())
            labels.append(b.label)
            truth.append(b.truth_p)
        p, y, t = map(np.concatenate, (allp, labels, truth))
        assert abs(p.mean() - y.mean()) < 0.05
        assert np.corrcoef(p, t)[0, 1] > 0.5

        resp = stub.Recommend(pb2.RecommendRequest(user_id=int(last.user_id[0]),
                                                   candidate_item_ids=np.unique(last.item_id)[:50].tolist()))
        assert resp.model_version == ps.state.version and len(resp.items) == min(50, np.unique(last.item_id).size)
        assert 0 <= resp.freshness_lag_ms
    finally:
        server.stop(0)
        ps.stop()

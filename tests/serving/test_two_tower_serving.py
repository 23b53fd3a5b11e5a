"""Two-tower retrieval end to end over the real broker: the trainer learns the two towers beside the
ranker and ships their vectors as rows; the serving replica holds them and Recommend without
candidates searches the item vectors with the user's own query vector."""

import uuid

import grpc
import numpy as np
import torch
from serving_helpers import _wait, run_trainer_on

from paramsync import ITEM_VECTORS, USER_VECTORS
from serving.config import ServeConfig
from serving.param_server import ParamServer, ParamServerConfig
from serving.pb import pb2, pb2_grpc
from serving.server import RecommendServer
from streams.generator import GeneratorConfig, SyntheticStream
from streams.kafka_io import topic_names
from training.config import TrainerConfig


def test_recommend_without_candidates_retrieves_with_the_trainers_two_tower_vectors(kafka_topics):
    stream = SyntheticStream(GeneratorConfig(users=200, items=300, seed=3))
    batches = [stream.examples(stream.block(128)) for _ in range(40)]
    cfg = TrainerConfig(group_id=f"t-{uuid.uuid4().hex[:8]}", batch_size=512, hidden=(32, 16),
                        idle_exit_s=2.0, max_batch_wait_ms=50, sparse_sync_interval_s=0.2,
                        dense_sync_interval_s=0.5, checkpoint_interval_s=1e9,
                        two_tower=True, two_tower_dim=16)
    trainer, runner = run_trainer_on(kafka_topics, cfg, batches)

    ps = ParamServer(ParamServerConfig(poll_timeout_ms=50), kafka_topics.bootstrap_servers,
                     topic_names(kafka_topics.topic_prefix).params)
    server = RecommendServer(ServeConfig(port=0, precision="float32", retrieval="exact", retrieve_k=20), ps).start()
    ps.start()
    channel = grpc.insecure_channel(server.address)
    try:
        runner.join(timeout=120)
        assert not runner.is_alive()
        assert trainer.two_tower.learner.stats.steps > 0
        table = trainer.learner.table
        assert _wait(lambda: ps.ready and ps.state.version == trainer.publisher.published_version, 30)
        served = ps.state.table
        items = table.ids(ITEM_VECTORS)
        assert len(items) > 100 and set(served.ids(ITEM_VECTORS)) == set(items)
        item_vecs = table.lookup(ITEM_VECTORS, torch.from_numpy(items))
        assert torch.equal(served.lookup(ITEM_VECTORS, torch.from_numpy(items)), item_vecs)

        stub = pb2_grpc.RecommenderStub(channel)
        user = int(batches[-1].user_id[0])
        query = table.lookup(USER_VECTORS, torch.tensor([user]))[0]
        want = items[torch.topk(item_vecs @ query, 20).indices.numpy()]
        resp = stub.Recommend(pb2.RecommendRequest(user_id=user, top_k=20))
        assert resp.candidate_source == "two_tower_exact"
        assert set(i.item_id for i in resp.items) == set(want.tolist())  # ranked by the DLRM after
        # A user the two-tower has no row for is served by the ranker's own query, as before.
        resp = stub.Recommend(pb2.RecommendRequest(user_id=10**9, top_k=5))
        assert resp.candidate_source == "exact" and len(resp.items) == 5
    finally:
        channel.close()
        server.stop(0)
        ps.stop()


def test_the_two_tower_index_is_saved_beside_the_replica_in_a_directory_of_its_own(tmp_path):
    from embedding_store import SlotConfig, SlotDelta, TableDelta
    from serving.ann_retrieval import ItemRetriever
    from serving.replica_persistence import _save_companions
    from serving.testing import random_model

    table = random_model(items=1200, dim=8).table
    table.add_slot(SlotConfig(name=ITEM_VECTORS, dim=16))
    vecs = torch.nn.functional.normalize(torch.randn(1500, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    table.import_delta(TableDelta(0, int(table.version) + 1, {ITEM_VECTORS: SlotDelta(np.arange(1500), vecs)}))

    def retriever(slot, **kw):
        r = ItemRetriever("ann", slot, 0, 100, str(tmp_path), save_interval_s=0.0, **kw)
        dim = table.slots[slot].dim
        r.retrieve(table, torch.ones(dim), 10)
        assert _wait(lambda: r.ann is not None and r.wait_synced(1), 20)
        return r

    ranker, vectors = retriever("item_id"), retriever(ITEM_VECTORS, name="ann_two_tower")
    _save_companions(tmp_path)
    assert (tmp_path / "ann" / "meta.json").exists() and (tmp_path / "ann_two_tower" / "meta.json").exists()
    again = retriever(ITEM_VECTORS, name="ann_two_tower")
    assert again.loaded and len(again.ann) == 1500
    q = vecs[7]
    assert np.array_equal(again.retrieve(table, q, 10).ids, vectors.retrieve(table, q, 10).ids)
    del ranker

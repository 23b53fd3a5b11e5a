"""Helpers for the sharded-PS tests: a sharded trainer, a shard fleet and a recommender over it."""

import grpc
import numpy as np
import torch
from kafka import KafkaProducer

from embedding_store import EmbeddingTable, SlotConfig, TableDelta
from embedding_store.delta import SlotDelta
from embedding_store.sharding import shard_of
from paramsync import control_partition, params_partitions
from serving.config import ServeConfig
from serving.param_server import ParamServer, ParamServerConfig
from serving.pb import pb2_grpc
from serving.ps_service import PsServer
from serving.remote_table import ShardedModelSource
from serving.scoring import ServingModel
from serving.server import RecommendServer, StaticModelSource
from serving.shard_fleet import ShardFleet
from streams.kafka_io import topic_names
from training.model import DenseTower, ModelConfig, tower_to_safetensors
from training.sync import DeltaPublisher, SyncConfig

SLOTS = ("user_id", "item_id", "city")
DIM = 8


def sharded_topics(kafka_broker, prefix, num_shards):
    """A fresh topic set whose hw.params has the partitions ``num_shards`` PS shards need."""
    kafka_broker.create_topics(prefix, {"params": params_partitions(num_shards)})
    return kafka_broker.kafka_config(prefix)


class ShardedTrainer:
    """The trainer's side: a real table + tower published by the real DeltaPublisher, sharded."""

    def __init__(self, kafka, num_shards, seed=0):
        torch.manual_seed(seed)
        self.tower = DenseTower(ModelConfig(slots=SLOTS, embedding_dim=DIM, hidden=(16,))).eval()
        self.table = EmbeddingTable([SlotConfig(name=s, dim=DIM) for s in SLOTS], seed=seed)
        self.producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all", linger_ms=0)
        self.topic = topic_names(kafka.topic_prefix).params
        self.pub = DeltaPublisher(self.producer, self.topic, self.table,
                                  lambda: tower_to_safetensors(self.tower),
                                  SyncConfig(model_id="ctr", num_param_shards=num_shards))

    def train(self, slot, ids, scale=0.1):
        ids = torch.as_tensor(ids, dtype=torch.int64)
        self.table.lookup(slot, ids, train=True)
        self.table.apply_gradients(slot, ids, torch.randn(ids.numel(), DIM) * scale)

    def model(self, table=None):
        return ServingModel("ctr", table or self.table, self.tower, int(self.table.version), 0)

    def only_shards(self, keep, num_shards):
        """A copy of the table holding only the rows of shards in ``keep`` (the rest read defaults)."""
        out = EmbeddingTable([SlotConfig(name=s, dim=DIM) for s in SLOTS])
        delta = self.table.export_delta(since_version=0)
        slots = {}
        for name, sd in delta.slots.items():
            mine = np.isin(shard_of(sd.ids, num_shards), keep)
            slots[name] = SlotDelta(ids=sd.ids[mine], values=sd.values[torch.from_numpy(mine)])
        out.import_delta(TableDelta(from_version=0, to_version=delta.to_version, slots=slots))
        return out

    def close(self):
        self.producer.close()


class Fleet:
    """N shard processes' parts in this process: ParamServer + PsServer each, on loopback."""

    def __init__(self, kafka, topic, num_shards, **ps_kw):
        self.shards = []
        for i in range(num_shards):
            ps = ParamServer(ParamServerConfig(num_shards=num_shards, shard_index=i, poll_timeout_ms=50, **ps_kw),
                             kafka.bootstrap_servers, topic)
            ps.start()
            self.shards.append((ps, PsServer(ps).start()))

    @property
    def addresses(self):
        return [server.address for _, server in self.shards]

    def kill(self, i):
        ps, server = self.shards[i]
        server.stop(0)
        ps.stop()

    def close(self):
        for ps, server in self.shards:
            server.stop(0)
            ps.stop()


class RecommenderReplica:
    """A ``--role recommender`` replica: control-partition tower + fan-out to the fleet."""

    def __init__(self, kafka, topic, addresses, deadline_s=2.0):
        n = len(addresses)
        self.control = ParamServer(ParamServerConfig(num_shards=n, poll_timeout_ms=50),
                                   kafka.bootstrap_servers, topic, partition=control_partition(n))
        self.control.start()
        self.fleet = ShardFleet(addresses, deadline_s)
        self.source = ShardedModelSource(self.control, self.fleet)
        self.server = RecommendServer(ServeConfig(port=0, precision="float32"), self.source).start()
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = pb2_grpc.RecommenderStub(self.channel)

    def close(self):
        self.channel.close()
        self.server.stop(0)
        self.control.stop()
        self.fleet.close()


class StaticServer:
    """An unsharded reference server over a fixed model."""

    def __init__(self, model):
        self.server = RecommendServer(ServeConfig(port=0, precision="float32"), StaticModelSource(model)).start()
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = pb2_grpc.RecommenderStub(self.channel)

    def close(self):
        self.channel.close()
        self.server.stop(0)

"""Parameter sync: the ``hw.params`` protocol between the trainer (publisher) and serving (follower).

Neither side owns it: training publishes with it (:class:`training.sync.DeltaPublisher`), serving
follows with it (:class:`serving.param_server.ParamServer`), and neither imports the other's
internals. It depends on ``embedding_store`` (a sparse payload is its delta encoding) and on no
model: the tower travels as opaque bytes that the replica's :data:`TowerLoader` rebuilds.

- :mod:`paramsync.wire`: the message envelope, its kinds, chunking, the partition layout.
- :mod:`paramsync.follower`: where a new replica starts (:func:`bootstrap_offset`) and tailing one
  partition (:class:`ParamsFollower`).
- :mod:`paramsync.replica`: :class:`ReplicaState`, the semantics of applying messages in order.
- :mod:`paramsync.topic`: creating the topic with the partitions a shard count needs.
- :mod:`paramsync.retrieval_slots`: the slots a retrieval model's vectors travel in.

Importing it loads neither Kafka nor torch.
"""

from paramsync.follower import ParamsFollower, bootstrap_offset
from paramsync.replica import LoadedTower, ReplicaState, TowerLoader, add_retrieval_slots
from paramsync.retrieval_slots import ITEM_VECTORS, RETRIEVAL_SLOTS, USER_VECTORS
from paramsync.topic import ensure_params_partitions
from paramsync.wire import (CONTROL, CONTROL_SHARD, DENSE, HEADER_BYTES, KINDS, SNAPSHOT_BEGIN,
                            SNAPSHOT_END, SPARSE, WIRE_VERSION, ControlCommand, ParamsMessage,
                            ParamsWireError, control_partition, decode_params, encode_params,
                            join_payload, params_partitions, payload_chunks)

__all__ = ["WIRE_VERSION", "SPARSE", "DENSE", "SNAPSHOT_BEGIN", "SNAPSHOT_END", "CONTROL", "KINDS",
           "CONTROL_SHARD", "HEADER_BYTES", "ParamsMessage", "ParamsWireError", "ControlCommand",
           "encode_params", "decode_params", "payload_chunks", "join_payload", "params_partitions",
           "control_partition", "bootstrap_offset", "ParamsFollower", "ReplicaState", "LoadedTower",
           "TowerLoader", "ensure_params_partitions", "add_retrieval_slots", "USER_VECTORS", "ITEM_VECTORS",
           "RETRIEVAL_SLOTS"]

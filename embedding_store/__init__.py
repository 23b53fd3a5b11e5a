"""embedding_store: the collisionless, expirable embedding table (see docs/architecture.md "The
embedding store" and docs/api.md)."""

from embedding_store.delta import DeltaFormatError, SlotDelta, TableDelta, decode_delta, encode_delta
from embedding_store.kernels import bag_grads_to_ids
from embedding_store.sharding import shard_of
from embedding_store.slots import SlotConfig
from embedding_store.table import EmbeddingTable

__all__ = [
    "DeltaFormatError", "EmbeddingTable", "SlotConfig", "SlotDelta", "TableDelta",
    "bag_grads_to_ids", "decode_delta", "encode_delta", "shard_of",
]

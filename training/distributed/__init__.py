"""Multi-rank training: row-wise sharded embedding tables + a data-parallel dense tower.

``headwater train --nproc N`` (or ``torchrun ... headwater train``) runs N ranks. Each rank owns
the ids with ``embedding_store.sharding.shard_of(id, N) == rank`` (the same rule the serving PS
shards use), consumes its own ``hw.examples`` partitions in one consumer group, and trains in
lockstep with the others:

- :mod:`.env` -- the torchrun environment (RANK, WORLD_SIZE, ...), process-group set-up, and the
  launcher that spawns N ranks itself;
- :mod:`.exchange` -- variable-size ``all_to_all`` (counts first, then payload) and small
  control collectives;
- :mod:`.sharded` -- the row-wise sharded lookup and gradient return (TorchRec-style);
- :mod:`.learner` -- one lockstep training step (DDP tower, sharded sparse half), with an early
  stream's delayed-feedback handling;
- :mod:`.early` -- an early stream's rows routed to the rank that owns their impression;
- :mod:`.checkpoint` -- per-shard checkpoints, one manifest, re-sharding on restore;
- :mod:`.publisher` -- each rank publishes its shard's rows; rank 0 the dense tower; snapshots
  are assembled collectively;
- :mod:`.consumer` -- each rank's ``hw.examples`` partitions (assigned by rank, one group);
- :mod:`.trainer` -- the Kafka loop around it;
- its benchmark, ``headwater bench trainer --nproc N`` (1 vs N ranks in one run), is
  :mod:`bench.trainer_ranks`.
"""

from training.distributed.env import DistEnv

__all__ = ["DistEnv"]

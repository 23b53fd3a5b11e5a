"""An early-emitted stream across ranks: each impression's rows meet on one rank.

With ``headwater join --emit early`` an impression reaches the trainer as a negative at once and,
if clicked, later as a positive copy (:mod:`training.delayed_feedback`). The joiner sends its
example batches to any ``hw.examples`` partition, so the copy may be read by another rank than
its negative. Three per-learner pieces need the pair on one learner: the feature memory (the
copy trains on its negative's tower input), the cold-start hold (a copy merges into its held
negative) and the live evaluation (:class:`training.early_labels.EarlyLabels`: the negative's
score waits for the copy). :func:`route_early` sends every early row to the rank that owns its
impression, ``shard_of(copy id, world)`` (the copy's id for both), before de-dup; windowed rows
stay where they were read. It is one variable-size ``all_to_all`` of encoded rows
(:func:`streams.example_batch.encode_examples`, no pickle) per call, counts first.
"""

from __future__ import annotations

import numpy as np
import torch

from embedding_store.sharding import shard_of
from streams.events import ExampleBatch
from training.distributed.exchange import ExchangeTimer, all_to_all_rows, exchange_counts

__all__ = ["impression_owner", "reshard_hold", "route_early", "steps_of"]


def impression_owner(batch: ExampleBatch, rank: int, world: int) -> np.ndarray:
    """int64[n]: the rank each row trains on: an early row's impression owner, else ``rank``."""
    from streams.join_build import positive_copy_ids

    owner = np.full(len(batch), rank, np.int64)
    early = np.flatnonzero(batch.early)
    if len(early):
        ids = batch.example_id[early]
        key = np.where(batch.label[early] > 0.5, ids, positive_copy_ids(ids))
        owner[early] = shard_of(key, world)
    return owner


def route_early(batch: ExampleBatch, rank: int, world: int,
                timer: ExchangeTimer | None = None) -> ExampleBatch:
    """Collective (every rank, every call): this rank's windowed rows and kept early rows, then
    the early rows the peers sent it, in rank order."""
    from streams.example_batch import decode_examples, encode_examples

    if world == 1:
        return batch
    owner = impression_owner(batch, rank, world)
    away = owner != rank
    payload = [encode_examples(batch.take(owner == p)) if p != rank and (owner == p).any() else b""
               for p in range(world)]
    send = [len(x) for x in payload]
    recv = exchange_counts(torch.tensor(send, dtype=torch.int64), timer).tolist()
    if not any(send) and not any(recv):
        return batch
    data = b"".join(payload)
    out = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if data
           else torch.zeros(0, dtype=torch.uint8))
    got = all_to_all_rows(out, send, recv, timer).numpy().tobytes()
    parts = [batch.take(~away) if away.any() else batch]
    at = 0
    for size in recv:
        if size:
            parts.append(decode_examples(got[at:at + size]))
        at += size
    return ExampleBatch.concat(parts) if len(parts) > 1 else parts[0]


def steps_of(rows: ExampleBatch, size: int) -> list[ExampleBatch]:
    """``rows`` in consecutive steps of at most ``size`` rows (as
    :meth:`training.learner.Learner._train_rows` splits a release of held rows)."""
    n = len(rows)
    if n <= size:
        return [rows] if n else []
    return [rows.take(np.arange(i, min(n, i + size))) for i in range(0, n, size)]


def reshard_hold(states: list[tuple[bytes, dict] | None], rank: int, world: int
                 ) -> tuple[bytes, dict] | None:
    """The cold-start hold of new rank ``rank`` of ``world`` from the old ranks' checkpointed
    holds (:meth:`ColdStartHold.state`; None where a rank's was done): the held rows whose
    impression it owns now (as :func:`route_early` routes their copies), each row on one rank,
    and the global warm-up count. None when no old rank still held."""
    from streams.example_batch import decode_examples, encode_examples
    from streams.join_build import positive_copy_ids

    kept = [s for s in states if s is not None]
    if not kept:
        return None
    parts = []
    for rows, _ in kept:
        part = decode_examples(rows)
        if len(part):
            parts.append(part.take(shard_of(positive_copy_ids(part.example_id), world) == rank))
    rows = ExampleBatch.concat(parts) if parts else ExampleBatch.empty()
    infos = [info for _, info in kept]
    warm_at = [i["warm_at_ms"] for i in infos if i["warm_at_ms"] is not None]
    info = {**infos[0], "final_trained": max(int(i["final_trained"]) for i in infos),
            "watermark_ms": max(int(i["watermark_ms"]) for i in infos),
            "warm_at_ms": min(warm_at) if warm_at else None}
    for key in ("held", "merged", "released"):  # the old ranks' counts, summed
        info[key] = sum(int(i[key]) for i in infos)
    info["held"] = max(info["held"], len(rows))
    return encode_examples(rows), info

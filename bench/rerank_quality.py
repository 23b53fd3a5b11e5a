"""The offline quality half of ``headwater bench rerank``: NDCG@10 on the world's stream.

The DLRM's prequential scores over the stream are computed once (:func:`prequential`) and shared
by ``bench.rerank``'s fixed-weight NDCG and :func:`tuned_ndcg`, which replays the training
requests' clicks into a :class:`serving.rerank_tuning.WeightTuner` and scores the held-out
requests at the weight it picked.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np

__all__ = ["ndcg_at", "prequential", "tuned_ndcg"]


def ndcg_at(order_labels: np.ndarray, k: int = 10) -> float:
    gains = order_labels[:k]
    disc = 1.0 / np.log2(np.arange(2, gains.size + 2))
    ideal = np.sort(order_labels)[::-1][:k]
    best = float((ideal * disc[: ideal.size]).sum())
    return float((gains * disc).sum()) / best if best > 0 else float("nan")


def prequential(world, total: int) -> tuple:
    """The DLRM learning prequentially over the world's first ``total`` requests (computed once):
    ``(run, users[r], items[r, k], clicked[r, k], logits[r, k])``, each logit scored before the
    DLRM learned its request."""
    if getattr(world, "prequential", None) is None or world.prequential[0] != total:
        from training.config import TrainerConfig
        from training.prequential import run_stream

        stream = world.stream
        blocks = list(stream.blocks(total, 250))
        res = run_stream((stream.examples(b) for b in blocks), TrainerConfig(batch_size=256))
        items = np.concatenate([b.items for b in blocks])
        world.prequential = (total, (res, np.concatenate([b.user_id for b in blocks]), items,
                                     np.concatenate([b.clicked for b in blocks]),
                                     np.concatenate(res.evaluator.logits).reshape(-1, items.shape[1])))
    return world.prequential[1]


def tuned_ndcg(world, rt, args) -> dict:
    """Offline: NDCG@10 of the blend with the weight the online tuner (``serving.rerank_tuning``)
    learned from the clicks on the last ``--tune-requests`` training requests, on the held-out
    requests of ``bench.rerank._ndcg`` (same prompts: the user's earlier clicks). The tuning
    requests are served as serving would serve them (a stage of its own over the same LLM, texts
    and settings, tuning on, each call at the weight the tuner serves then), and each one's clicks
    reach the tuner as the live history hands them over, right after its call. (The world's own
    clock runs 6000 requests in 30 s with clicks up to 30 s late, after the user's next few calls;
    here requests are 1 s apart, clicks 0.5 s after.)"""
    from serving.rerank import RerankStage
    from serving.user_history import Interaction, UserHistory

    total = args.train_requests + args.eval_requests
    _, users, items, clicked, logits = prequential(world, total)
    history = UserHistory()
    cfg = replace(rt.stage.cfg, rerank_weight_tuning=True, rerank_deadline_ms=600_000.0)  # quality, not latency
    stage = RerankStage(cfg, rt.backend, rt.texts, history)
    tuner, top_n = stage.tuner, cfg.rerank_top_n
    first = max(0, args.train_requests - args.tune_requests)
    clicks: dict[int, list[int]] = {}
    weight, ndcg = stage.weight, []
    for r in range(total):
        if r == args.train_requests:
            weight = stage.weight  # what the tuning requests taught it, frozen for the held-out ones
        u, held_out, liked = int(users[r]), r >= args.train_requests, items[r][clicked[r]]
        if r >= first and (liked.size or not held_out):
            history._users.pop(u, None)
            for j, item in enumerate(clicks.get(u, [])[-50:]):  # as _ndcg: the user's earlier clicks
                history.add(u, item, "click", j)
            p = 1.0 / (1.0 + np.exp(-logits[r].astype(np.float64)))
            order = np.lexsort((items[r], -p))
            top = order[:top_n]
            out = asyncio.run(stage.rerank(u, items[r][top], p[top], weight if held_out else stage.weight))
            if held_out:
                final = order if isinstance(out, str) else np.concatenate([top[out.order], order[len(top):]])
                ndcg.append(ndcg_at(clicked[r][final].astype(float)))
            else:  # the call at 1 s per request (its tuner's clock), the clicks half a second later
                tuner.observe([(u, Interaction(int(i), "click", 1000 * (r - first + 1) + 500)) for i in liked])
        clicks.setdefault(u, []).extend(int(i) for i in liked)
    return {"ndcg_at_10_tuned": round(float(np.nanmean(ndcg)), 4), "tuned_weight": weight,
            "tuning_outcomes": tuner.outcomes, "tuning_requests": args.train_requests - first}

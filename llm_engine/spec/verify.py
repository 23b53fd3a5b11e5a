"""Lossless verification of draft tokens against the target model's next-token distributions.

The drafter is deterministic (its proposal distribution is a point mass), which makes the
speculative-sampling rule simple: accept draft token ``x`` with probability ``p(x)``; on
rejection, sample from ``p`` with ``x`` removed and renormalised. Accepting with ``p(x)`` and
otherwise drawing from the rest gives exactly ``p``, so the output distribution is the target's.
For a tree, the children of a node are tried in turn against the residual distribution (the
multi-candidate rule of SpecInfer), which is lossless for the same reason. Greedy verification
accepts the longest prefix equal to the target's argmax, so the output is identical to plain
greedy decoding.

``probs``/``logits`` rows: row 0 is the distribution after the request's last real token,
row ``i + 1`` the one after draft node ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_engine.spec.ngram import DraftTree


@dataclass
class VerifyResult:
    """Tokens to append (accepted drafts then one token from the target) and how many drafts
    were accepted; ``path`` lists the accepted tree nodes (rows whose KV stays valid)."""

    tokens: list[int]
    num_accepted: int
    path: list[int]


def verify_greedy(logits: torch.Tensor, draft: list[int]) -> VerifyResult:
    """Chain verification under greedy decoding: ``logits`` is [len(draft) + 1, V]."""
    best = logits.argmax(-1)
    k = len(draft)
    if k:
        ok = (best[:k] == torch.tensor(draft, device=best.device)).long()
        n = int(ok.cumprod(0).sum())
    else:
        n = 0
    return VerifyResult(list(draft[:n]) + [int(best[n])], n, list(range(n)))


def verify_sampled(probs: torch.Tensor, draft: list[int], generator: torch.Generator | None = None) -> VerifyResult:
    """Chain verification by rejection sampling: ``probs`` is [len(draft) + 1, V] (after the
    request's temperature / top-k / top-p processing)."""
    k = len(draft)
    n = 0
    if k:
        d = torch.tensor(draft, device=probs.device)
        p_draft = probs[:k].gather(1, d[:, None])[:, 0]
        u = torch.rand(k, generator=generator, device="cpu").to(probs.device)
        ok = (u < p_draft).long()
        n = int(ok.cumprod(0).sum())
    row = probs[n].clone()
    if n < k:
        row[draft[n]] = 0.0
    tok = _sample(row, generator)
    return VerifyResult(list(draft[:n]) + [tok], n, list(range(n)))


def verify_tree_greedy(logits: torch.Tensor, tree: DraftTree) -> VerifyResult:
    """Follows the target's argmax down the tree; ``logits`` is [len(tree) + 1, V]."""
    best = logits.argmax(-1).tolist()
    node, path, out = -1, [], []
    while True:
        want = best[node + 1]
        nxt = next((c for c in tree.children(node) if tree.tokens[c] == want), None)
        out.append(want)
        if nxt is None:
            return VerifyResult(out, len(path), path)
        path.append(nxt)
        node = nxt


def verify_tree_sampled(probs: torch.Tensor, tree: DraftTree, generator: torch.Generator | None = None) -> VerifyResult:
    """Multi-candidate rejection sampling down the tree; ``probs`` is [len(tree) + 1, V]."""
    node, path, out = -1, [], []
    while True:
        residual = probs[node + 1].double().clone()
        chosen = None
        for c in tree.children(node):
            tok = tree.tokens[c]
            mass = residual.sum()
            if mass <= 0:
                break
            if float(torch.rand((), generator=generator)) < float(residual[tok] / mass):
                chosen = c
                break
            residual[tok] = 0.0
        if chosen is None:
            out.append(_sample(residual, generator))
            return VerifyResult(out, len(path), path)
        out.append(tree.tokens[chosen])
        path.append(chosen)
        node = chosen


def _sample(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    w = weights.double().cpu()
    if float(w.sum()) <= 0:  # every candidate rejected and nothing left: cannot happen for a
        return int(weights.argmax())  # proper distribution, but never divide by zero.
    return int(torch.multinomial(w, 1, generator=generator))

"""Model-free drafting: continue the latest n-gram the way it continued before in this request.

Summaries, code edits and extraction copy spans of their input, so the tokens that followed an
earlier occurrence of the request's last few tokens are good guesses for what comes next. The
index maps every n-gram (``min_n``..``max_n`` tokens) of the prompt and output to the positions
right after its most recent occurrences; it is updated incrementally as tokens are appended
(O(max_n) per token), so proposing costs a few dictionary look-ups, never a scan.

Several distinct continuations (from different occurrences, longest match first) form a
:class:`DraftTree`: branches sharing a first token share a node, so one verification pass checks
them all (Lookahead decoding's multi-branch idea with n-gram sources instead of Jacobi guesses).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DraftTree:
    """Draft tokens as a tree: node ``i`` holds ``tokens[i]`` and hangs under ``parents[i]``
    (``-1`` = the request's last real token). Nodes are in topological order; a single branch
    is the chain ``parents == [-1, 0, 1, ...]``."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: list[int]) -> DraftTree:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)))

    @classmethod
    def from_branches(cls, branches: list[list[int]], max_nodes: int) -> DraftTree:
        """Merges branches into a trie, first branches first, keeping at most ``max_nodes``."""
        tree = cls()
        children: dict[tuple[int, int], int] = {}
        for branch in branches:
            parent = -1
            for tok in branch:
                node = children.get((parent, tok))
                if node is None:
                    if len(tree) >= max_nodes:
                        break
                    node = len(tree)
                    tree.tokens.append(tok)
                    tree.parents.append(parent)
                    children[(parent, tok)] = node
                parent = node
        return tree

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]

    def depths(self) -> list[int]:
        """Depth of every node (1 for children of the root); position offset of its token."""
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out

    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self.tokens) - 1))


class NgramDrafter:
    """Incremental n-gram index over one request's tokens, proposing draft continuations."""

    def __init__(self, min_n: int = 2, max_n: int = 4, max_occurrences: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n, self.max_occurrences = min_n, max_n, max_occurrences
        self.tokens: list[int] = []
        # n-gram -> positions right after its occurrences, most recent last.
        self._index: dict[tuple[int, ...], list[int]] = {}

    def extend(self, tokens: list[int]) -> None:
        """Appends tokens (prompt or accepted output) and indexes the n-grams they complete."""
        toks = self.tokens
        for tok in tokens:
            toks.append(tok)
            end = len(toks)
            # The n-gram ending at the newest token is indexed only once the token after it
            # exists, so a look-up of the current suffix never finds itself.
            for n in range(self.min_n, self.max_n + 1):
                start = end - 1 - n
                if start < 0:
                    break
                key = tuple(toks[start : end - 1])
                occ = self._index.setdefault(key, [])
                occ.append(end - 1)
                if len(occ) > self.max_occurrences:
                    del occ[0]

    def propose(self, k: int, branches: int = 1) -> list[list[int]]:
        """Up to ``branches`` distinct continuations of up to ``k`` tokens, best first: longest
        matching n-gram first, most recent occurrence first within one n."""
        if k <= 0 or branches <= 0:
            return []
        toks, out, seen = self.tokens, [], set()
        for n in range(min(self.max_n, len(toks)), self.min_n - 1, -1):
            for pos in reversed(self._index.get(tuple(toks[len(toks) - n :]), ())):
                cont = tuple(toks[pos : pos + k])
                if cont and cont not in seen:
                    seen.add(cont)
                    out.append(list(cont))
                    if len(out) >= branches:
                        return out
        return out

    def propose_tree(self, k: int, branches: int = 1, max_nodes: int | None = None) -> DraftTree:
        return DraftTree.from_branches(self.propose(k, branches), max_nodes or k * max(branches, 1))

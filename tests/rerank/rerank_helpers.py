"""Item texts the rerank tests use (items 0..199 have one; others have none), and block counting."""

WORDS = ["science fiction", "romantic", "quick brown fox", "lazy dog", "space opera", "robots", "dune", "titanic"]


def item_text(i: int) -> str:
    return f"{WORDS[i % len(WORDS)]} film number {i}"


BLOCK = 16  # the engine's default KV block size


def blocks_shared(a: list[int], b: list[int]) -> int:
    """Tokens of ``b`` a block-level prefix cache holds after computing ``a`` (full blocks only,
    never ``b``'s last token)."""
    n = 0
    while n + BLOCK <= min(len(a), len(b) - 1) and a[n:n + BLOCK] == b[n:n + BLOCK]:
        n += BLOCK
    return n


def tokens_shared(a: list[int], b: list[int]) -> int:
    """Tokens of ``b`` a token-granular prefix cache holds after computing ``a`` (full blocks,
    then the leading tokens of the next one; never ``b``'s last token)."""
    n = 0
    while n < min(len(a), len(b) - 1) and a[n] == b[n]:
        n += 1
    return n

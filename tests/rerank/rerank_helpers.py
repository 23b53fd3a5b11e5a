"""Item texts the rerank tests use (items 0..199 have one; others have none)."""

WORDS = ["science fiction", "romantic", "quick brown fox", "lazy dog", "space opera", "robots", "dune", "titanic"]


def item_text(i: int) -> str:
    return f"{WORDS[i % len(WORDS)]} film number {i}"

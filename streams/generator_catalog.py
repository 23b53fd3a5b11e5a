"""Item texts for the synthetic world that agree with its hidden item vectors.

The generator's items have hidden vectors (:class:`streams.generator.SyntheticStream.item_v`);
a catalog whose words come from those vectors carries real signal, so an LLM reranker reading
the texts can learn nothing the DLRM could not, but also has something true to read. Each
latent dimension has a word for its positive and one for its negative side; an item's
description is the words of its ``words`` largest coordinates (by magnitude), strongest first,
and its title names its category. Deterministic: the same seed writes the same catalog.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from streams.generator import GeneratorConfig, SyntheticStream

__all__ = ["catalog_texts", "write_catalog", "POSITIVE", "NEGATIVE"]

POSITIVE = ["space", "romance", "comedy", "mystery", "history", "music", "family", "war", "sport", "horror",
            "animation", "crime", "fantasy", "nature", "science", "travel"]
NEGATIVE = ["western", "drama", "thriller", "documentary", "musical", "noir", "satire", "heist", "biopic",
            "disaster", "superhero", "spy", "martial-arts", "courtroom", "zombie", "cooking"]


def catalog_texts(stream: SyntheticStream, words: int = 3) -> dict[int, str]:
    """item id -> ``"<title> | <description>"`` for every item of the stream's world."""
    v = stream.item_v
    d = v.shape[1]
    if d > len(POSITIVE):
        raise ValueError(f"the catalog vocabulary covers {len(POSITIVE)} latent dimensions, the world has {d}")
    top = np.argsort(-np.abs(v), axis=1)[:, :words]
    out = {}
    for item in range(v.shape[0]):
        desc = [POSITIVE[j] if v[item, j] > 0 else NEGATIVE[j] for j in top[item]]
        out[item] = f"Title {item} (collection {int(stream.category[item])}) | {' '.join(desc)}"
    return out


def write_catalog(cfg: GeneratorConfig, path: str | Path, words: int = 3) -> Path:
    """Writes the catalog as CSV (``item_id,title,description``), readable by ``--item-text``."""
    path = Path(path)
    texts = catalog_texts(SyntheticStream(cfg), words)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["item_id", "title", "description"])
        for item, text in texts.items():
            title, _, desc = text.partition(" | ")
            w.writerow([item, title, desc])
    return path

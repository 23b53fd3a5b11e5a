"""Crossed slots: one stable id per pair of ids of two slots, derived wherever a row is scored.

A crossed slot (``a*b``, e.g. ``user_id*genres``: a user's taste for a genre) holds one id per
pair of ids of its two parts. It is an ordinary slot of the model (its own rows, counters and
factors); only its bags are derived, from the parts' bags, wherever a row is scored (training
and serving call the same function). The id of a pair is ``mix64(mix64(a) ^ b)`` (splitmix64's
finaliser, :func:`hashing.mix64`): stable across processes and runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from hashing import mix64

__all__ = ["cross_name", "cross_parts", "user_item_crosses", "cross_bags", "with_cross_bags", "Bags"]

_SEP = "*"


def cross_name(a: str, b: str) -> str:
    """The slot name of the cross of slots ``a`` and ``b``."""
    return f"{a}{_SEP}{b}"


def user_item_crosses(item_slots: Sequence[str], user_slot: str = "user_id") -> tuple[str, ...]:
    """The crossed slots a real log gets by default: the user with every item-side categorical
    or multi-valued column (a user's rate within a genre, a brand, ...)."""
    return tuple(cross_name(user_slot, s) for s in item_slots)


def cross_parts(name: str) -> tuple[str, str]:
    """The two slots a crossed slot name joins; ValueError for anything else."""
    a, sep, b = name.partition(_SEP)
    if not sep or not a or not b or _SEP in b:
        raise ValueError(f"a crossed slot is named 'a{_SEP}b', got {name!r}")
    return a, b


def cross_bags(a_values: np.ndarray, a_lengths: np.ndarray, b_values: np.ndarray,
               b_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ids of every pair (one id of bag a, one of bag b): (values int64, lengths).

    Both sides have one bag per row; a row with an empty bag on either side gets an empty bag.
    """
    la = np.asarray(a_lengths, np.int64)
    lb = np.asarray(b_lengths, np.int64)
    if la.shape != lb.shape:
        raise ValueError(f"cross of {la.shape[0]} and {lb.shape[0]} bags")
    pairs = la * lb
    total = int(pairs.sum())
    if total == 0:
        return np.zeros(0, np.int64), pairs
    row = np.repeat(np.arange(len(la)), pairs)
    k = np.arange(total) - np.repeat(np.cumsum(pairs) - pairs, pairs)
    oa = np.cumsum(la) - la
    ob = np.cumsum(lb) - lb
    a = np.asarray(a_values, np.int64)[oa[row] + k // lb[row]]
    b = np.asarray(b_values, np.int64)[ob[row] + k % lb[row]]
    with np.errstate(over="ignore"):
        ids = mix64(mix64(a.view(np.uint64)) ^ b.view(np.uint64)).view(np.int64)
    return ids, pairs


@dataclass
class Bags:
    """One slot's bags of a batch: ``values`` int64[m] concatenated, ``lengths[i]`` ids for row i."""

    values: np.ndarray
    lengths: np.ndarray


def with_cross_bags(sparse: Mapping[str, Any], crosses: Sequence[str], n: int) -> dict[str, Any]:
    """``sparse`` (slot -> bags with ``values`` and ``lengths``) plus every crossed slot's bags
    (a missing part: ``n`` empty bags), as training and serving both derive them."""
    out = dict(sparse)
    for name in crosses:
        a, b = (sparse.get(p) for p in cross_parts(name))
        if a is None or b is None:
            out[name] = Bags(np.zeros(0, np.int64), np.zeros(n, np.int32))
            continue
        values, lengths = cross_bags(a.values, a.lengths, b.values, b.lengths)
        out[name] = Bags(values, lengths.astype(np.int32))
    return out

"""``recent_items``: each request's bag of its user's last positive items, from the log itself.

What a user did just before is often the best clue to what they do next (a series watched in
order, accessories after a purchase), and per-id counts and embeddings of the user alone average
it away. With ``recent_items = N`` in the schema, every row of a request carries, as a user-side
slot named ``recent_items``, the item ids of the user's last N positive rows with an event time
strictly before the request's (never the request's own, never later ones), oldest first. The ids
are the items' own ids (the ``item_id`` slot's), so a caller of Recommend passes the user's
recent items as they are (``context: [{slot: "recent_items", ids: [...]}]``); the model learns
the slot's own embeddings and pools them by their sum (the bag's size tells a new user from a
regular one).
"""

from __future__ import annotations

import numpy as np

from streams.events import Ragged

__all__ = ["RECENT_SLOT", "recent_positives"]

RECENT_SLOT = "recent_items"  # the slot's name, in the schema, the model and Recommend's context


def recent_positives(user: np.ndarray, ts: np.ndarray, item: np.ndarray, label: np.ndarray,
                     starts: np.ndarray, k: int) -> Ragged:
    """One bag per row (rows in event-time order, requests starting at ``starts``): the items of
    the row's user's last ``k`` positive rows strictly earlier in event time, oldest first."""
    n = len(user)
    if n == 0 or k <= 0:
        return Ragged.empty(n)
    _, uidx = np.unique(user, return_inverse=True)
    _, trank = np.unique(ts, return_inverse=True)
    key = uidx.astype(np.int64) * (n + 1) + trank  # (user, time) in one sortable int64
    pos = np.flatnonzero(label > 0)
    order = pos[np.lexsort((pos, key[pos]))]  # positives by user, then time, then row
    pos_key, pos_item = key[order], item[order]
    firsts = starts[:-1]
    hi = np.searchsorted(pos_key, key[firsts], side="left")  # this user's positives before the request
    lo = np.searchsorted(pos_key, uidx[firsts].astype(np.int64) * (n + 1), side="left")
    start = np.maximum(lo, hi - k)
    counts = hi - start
    offsets = np.cumsum(counts) - counts
    take = np.repeat(start - offsets, counts) + np.arange(int(counts.sum()))
    per_request = Ragged(pos_item[take].astype(np.int64), counts.astype(np.int32))
    return per_request.take(np.repeat(np.arange(len(firsts)), np.diff(starts)))

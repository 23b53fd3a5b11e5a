"""Rows of a log that are one example: what makes a log's rows the examples the joiner would build.

Exports write one row per event, and two kinds of rows are one event seen twice:

- **a row logged twice** (same user, item and time): the event once, with the largest label of
  the copies (a view row and a click row of one showing are one clicked example);
- **in an event log** (``positive_values``: ``view``, ``addtocart``, ``transaction``), a view and
  the engagements of the same user with the same item that follow it within the join window:
  the joiner joins an action to the impression it followed (:mod:`streams.join_build`), so the
  view is the example, a positive, and the engagement rows are its label, not examples of their
  own. Read row by row instead, the view that led to a purchase is a negative and the purchase a
  second example: the model learns that viewed items are not bought. An engagement with no view
  before it in the window (a cart filled from a list) stays an example of its own.

Both take rows in time order and return the rows to keep with their labels.
"""

from __future__ import annotations

import numpy as np

from streams.joiner_config import JoinerConfig

__all__ = ["once_each", "engaged_views", "VIEW_WINDOW_MS"]

VIEW_WINDOW_MS = int(JoinerConfig.window_s * 1000)  # the online joiner's default window


def once_each(user: np.ndarray, item: np.ndarray, ts: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows to keep, their labels) of time-ordered rows where a row repeating an earlier row's
    (user, item, time) is one event logged twice: only its first row is kept, with the largest
    label of the copies. Only rows that share their time with a neighbour can repeat one: just
    those are sorted."""
    n = len(user)
    shared = np.zeros(n, bool)
    if n > 1:
        tie = ts[1:] == ts[:-1]
        shared[1:] |= tie
        shared[:-1] |= tie
    cand = np.flatnonzero(shared)
    by_key = cand[np.lexsort((cand, item[cand], ts[cand], user[cand]))]  # copies together, in row order
    first = np.ones(len(by_key), bool)
    first[1:] = ((user[by_key][1:] != user[by_key][:-1]) | (item[by_key][1:] != item[by_key][:-1])
                 | (ts[by_key][1:] != ts[by_key][:-1]))
    if first.all():
        return np.arange(n), label
    heads = np.flatnonzero(first)
    merged = label.copy()
    merged[by_key[heads]] = np.maximum.reduceat(label[by_key], heads)
    keep = np.ones(n, bool)
    keep[by_key[~first]] = False
    keep_rows = np.flatnonzero(keep)
    return keep_rows, merged[keep_rows]


def engaged_views(user: np.ndarray, item: np.ndarray, ts: np.ndarray, label: np.ndarray,
                  window_ms: int = VIEW_WINDOW_MS) -> tuple[np.ndarray, np.ndarray]:
    """(rows to keep, their labels) of time-ordered event rows (label 0: a view, 1: an
    engagement): each engagement within ``window_ms`` after the latest earlier view of the same
    user and item is folded into that view, which becomes a positive; other rows stay as they
    are."""
    n = len(user)
    if n == 0:
        return np.arange(0), label
    rows = np.lexsort((np.arange(n), item, user))  # per (user, item), in time order (rows are)
    u, i, t, y = user[rows], item[rows], ts[rows], label[rows]
    pos = np.arange(n)
    group_start = np.ones(n, bool)
    group_start[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    start = np.maximum.accumulate(np.where(group_start, pos, 0))
    view = np.maximum.accumulate(np.where(y <= 0, pos, -1))  # the latest view at or before
    has_view = view >= start
    folded = (y > 0) & has_view & (t - t[np.where(has_view, view, 0)] <= window_ms)
    if not folded.any():
        return np.arange(n), label
    merged = label.copy()
    merged[rows[view[folded]]] = 1
    keep = np.ones(n, bool)
    keep[rows[folded]] = False
    keep_rows = np.flatnonzero(keep)
    return keep_rows, merged[keep_rows]

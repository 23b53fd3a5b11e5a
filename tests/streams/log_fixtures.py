"""A small interaction log shaped like a real one, for tests (not a test module).

Import it from any test directory as ``from tests.streams.log_fixtures import write_real_shaped_csv``
(the repository root is on ``sys.path`` through the editable install).

The log looks like a MovieLens-style export joined with user and item tables: integer
``user_id``/``item_id``, ``label`` 0/1 (about 20% positives), ``ts`` in epoch seconds (or ms, or
ISO-8601), and feature columns of every kind a real log has:

==============  ======  ===========  ==============================================
column          side    kind         cells
==============  ======  ===========  ==============================================
``genres``      item    multi        ``Comedy|Romance``; one item has none (empty)
``year``        item    numeric      release year; empty for about 15% of items
``age``         user    numeric      18..64, one value per user
``gender``      user    categorical  ``M`` / ``F``
``occupation``  user    categorical  ``writer``, ``doctor``...; empty for some users
``device``      user    categorical  ``web``/``ios``/``android``, per request (context)
==============  ======  ===========  ==============================================

Item columns never vary within an item and user columns never within a user (``device`` is the
same for every row of one request, varying between a user's requests). Rows are written sorted
by user, not by time, as exports usually are, so a reader must sort by event time itself.
Clicks depend on a per-user and a per-item base rate and on whether the item's genres include
the user's favourite genre, so a learner has something to find.
"""

from __future__ import annotations

import datetime as _dt
import gzip
from pathlib import Path

import numpy as np

GENRES = ("Action", "Adventure", "Animation", "Comedy", "Crime", "Drama", "Horror", "Romance",
          "Sci-Fi", "Thriller")
OCCUPATIONS = ("writer", "doctor", "student", "artist", "engineer", "lawyer", "programmer")
DEVICES = ("web", "ios", "android")
HEADER = ("user_id", "item_id", "label", "ts", "genres", "year", "age", "gender", "occupation",
          "device")
START_S = 1_574_553_634  # 2019-11-24 00:00:34 UTC


def write_real_shaped_csv(path: str | Path, rows: int = 300, seed: int = 0, users: int = 40,
                          items: int = 60, time_format: str = "s") -> Path:
    """Writes the log described in the module docstring to ``path`` and returns the path.

    Deterministic for a given ``seed``. ``time_format`` is ``"s"`` (epoch seconds), ``"ms"``
    (epoch milliseconds) or ``"iso"`` (``2019-11-24 00:00:34.762830+00:00``, as the Open Bandit
    Dataset writes it). A path ending in ``.gz`` is gzip-compressed.
    """
    if time_format not in ("s", "ms", "iso"):
        raise ValueError(f"time_format must be s, ms or iso, got {time_format!r}")
    rng = np.random.default_rng(seed)
    # Item table.
    n_genres = rng.integers(1, 4, items)
    item_genres = [sorted(rng.choice(len(GENRES), k, replace=False).tolist()) for k in n_genres]
    item_genres[items // 2] = []  # one item with no genres: an empty multi-valued cell
    year = rng.integers(1950, 2020, items).astype(object)
    year[rng.random(items) < 0.15] = ""
    item_bias = rng.normal(0.0, 0.8, items)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.8  # heavy-tailed exposure
    popularity /= popularity.sum()
    # User table.
    age = rng.integers(18, 65, users)
    gender = rng.choice(["M", "F"], users)
    occupation = rng.choice(list(OCCUPATIONS), users).astype(object)
    occupation[rng.random(users) < 0.1] = ""
    favourite = rng.integers(0, len(GENRES), users)
    user_bias = rng.normal(0.0, 0.8, users)
    activity = rng.pareto(1.5, users) + 1.0
    activity /= activity.sum()

    out: list[tuple] = []
    t = START_S
    while len(out) < rows:
        u = int(rng.choice(users, p=activity))
        k = min(int(rng.integers(1, 4)), rows - len(out))
        shown = rng.choice(items, k, replace=False, p=popularity)
        t += int(rng.integers(1, 90))
        device = DEVICES[int(rng.integers(0, 3))]
        usec = int(rng.integers(0, 1_000_000))
        for i in shown.tolist():
            match = favourite[u] in item_genres[i]
            logit = -2.2 + user_bias[u] + item_bias[i] + 1.5 * match
            label = int(rng.random() < 1.0 / (1.0 + np.exp(-logit)))
            out.append((u + 1, i + 1, label, _time(t, usec, time_format),
                        "|".join(GENRES[g] for g in item_genres[i]), year[i], int(age[u]),
                        gender[u], occupation[u], device))
    out.sort(key=lambda r: r[0])  # exported by user, not by time (stable: time order within)
    text = ",".join(HEADER) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in out)
    path = Path(path)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def _time(t: int, usec: int, fmt: str) -> str:
    if fmt == "s":
        return str(t)
    if fmt == "ms":
        return str(t * 1000 + usec // 1000)
    return str(_dt.datetime.fromtimestamp(t, _dt.timezone.utc).replace(microsecond=usec))


def without_column(src: str | Path, dst: str | Path, column: str = "label") -> Path:
    """Writes ``src`` (a CSV) to ``dst`` without ``column``: the fixture without its label is
    a log of positives only (interactions, no impressions)."""
    import csv

    with open(src, newline="") as f:
        table = list(csv.reader(f))
    drop = table[0].index(column)
    with open(dst, "w", newline="") as f:
        csv.writer(f).writerows([r[:drop] + r[drop + 1:] for r in table])
    return Path(dst)

"""Item texts from a log's ``text`` columns: what the LLM rerank reads about each item.

A ``text`` column (item side; never a model feature) holds words about the item: a title, a
description. :class:`ItemTexts` keeps, per item, the text of its earliest row in event time
(ties: file order) whose text cells are not all empty, so the replay publishes one text per item
on ``hw.items`` (``ItemFeatures.text``) and serving's rerank finds it (``serving.item_text``).
Several text columns join in schema order as ``"<first>. <second>"``; a text longer than the
wire's limit is cut to it. Memory: one string per item, not per row.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streams.item_features import MAX_TEXT_CHARS

__all__ = ["ItemTexts", "row_texts"]


def row_texts(table: pa.Table, columns: Sequence[str]) -> pa.Array:
    """One string per row: the non-empty, trimmed cells of ``columns`` joined by ``". "``
    ("" when all are empty)."""
    cells = [pc.utf8_trim_whitespace(pc.fill_null(table.column(c).combine_chunks().cast(pa.string()), ""))
             for c in columns]
    if len(cells) == 1:
        return cells[0]
    rows = zip(*(c.to_pylist() for c in cells))
    return pa.array([". ".join(x for x in row if x) for row in rows], pa.string())


class ItemTexts:
    """Accumulates each item's first text over the chunks of a log (see the module doc)."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = tuple(columns)
        self._first: dict[int, tuple[int, int, str]] = {}  # item -> (ts, line, text)

    def add(self, table: pa.Table, item: np.ndarray, ts: np.ndarray, line: np.ndarray,
            keep: np.ndarray) -> None:
        """Takes the rows ``keep`` (indices) of one chunk, whose items, times and lines are given
        for every row of the chunk."""
        if not self.columns or not len(keep):
            return
        text = row_texts(table, self.columns).take(pa.array(keep))
        has = pc.not_equal(text, "").to_numpy(zero_copy_only=False)
        rows = keep[has]
        if not len(rows):
            return
        text = text.filter(pa.array(has))
        order = np.lexsort((line[rows], ts[rows], item[rows]))  # by item, then time, then line
        first = np.ones(len(order), bool)
        first[1:] = item[rows][order][1:] != item[rows][order][:-1]
        for k in order[first]:
            r = rows[k]
            key = (int(ts[r]), int(line[r]))
            seen = self._first.get(int(item[r]))
            if seen is None or key < seen[:2]:
                self._first[int(item[r])] = (*key, text[int(k)].as_py()[:MAX_TEXT_CHARS])

    def result(self) -> dict[int, str]:
        """item id -> text."""
        return {item: t for item, (_, _, t) in self._first.items()}

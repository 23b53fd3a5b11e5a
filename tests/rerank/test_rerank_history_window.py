"""The shown history window moves rarely: past its limit it drops to the low mark at once.

A moved start changes every position after it, so the whole context is computed again. The rule
(see :mod:`serving.rerank`): the start is the first multiple of the step from which the history
fits, the step being whole chunks that drop ``1 - rerank_history_low_mark`` of the limit.
"""

from __future__ import annotations

import numpy as np
import pytest

from serving.rerank import RerankConfig, history_step
from serving.user_history import Interaction
from tests.rerank.rerank_helpers import blocks_shared, item_text

# Short lines (at most 16 item tokens) and a 600-token model: about 22 lines fit; chunk 4.
SMALL = dict(max_model_len=600, rerank_item_tokens=16, rerank_history=64, rerank_history_chunk=4)


def _body(st, ctx: list[int]) -> list[int]:
    return ctx[len(st._header):len(ctx) - len(st._trailer)]


def _start(st, user: int) -> int:
    """Absolute position of the first shown interaction (every item here has a text)."""
    items, first = st.history.recent(user)
    total = first + len(items)
    body = _body(st, st.context_ids(user, fit=True))
    lines = [st.line_tokens(item_text(it.item_id), it.kind) for it in items]
    for k in range(len(lines) + 1):
        if [t for line in lines[k:] for t in line] == body:
            return total - (len(lines) - k)
    raise AssertionError("the context is not a suffix of the history")


def _shown_lines(st, user: int) -> int:
    items, first = st.history.recent(user)
    return first + len(items) - _start(st, user)


def _grow_until_cut(st, user: int) -> tuple[list[int], tuple[int, ...]]:
    """Appends interactions until the window's start first moves: the last uncut context, and
    the line that moved it."""
    k = 0
    st.history.add(user, k, "click", k)
    while True:
        ctx = st.context_ids(user, fit=True)
        k += 1
        st.history.add(user, k % 200, "click", k)
        if _start(st, user) > 0:
            return ctx, st.line_tokens(item_text(k % 200), "click")


def test_the_step_is_whole_chunks_dropping_one_minus_the_low_mark_of_the_limit():
    assert history_step(8, 0.5, 34) == 24  # drop 17 lines -> 3 chunks
    assert history_step(8, 1.0, 34) == 8  # low mark 1: one chunk, the rule before hysteresis
    assert history_step(8, 0.0, 34) == 40  # drop everything: the window restarts
    assert history_step(4, 0.7, 40) == 12  # (1 - 0.7) * 40 is 12.000000000000002, still 3 chunks
    assert history_step(16, 0.9, 20) == 16  # at least one chunk


def test_the_stage_s_limit_is_the_lines_the_model_holds_when_fewer_than_rerank_history(stage):
    st = stage(**SMALL, rerank_history_low_mark=0.5)
    longest = len(st._mark) + 16 + len(st._kind("click"))
    limit = st.history_budget // longest
    assert limit < 64 and st.history_step == history_step(4, 0.5, limit)
    assert stage(**{**SMALL, "rerank_history": 10}, rerank_history_low_mark=0.5).history_step == 8


@pytest.mark.parametrize("low_mark", [-0.1, 1.5])
def test_a_low_mark_outside_zero_to_one_is_refused(low_mark):
    with pytest.raises(ValueError, match="low_mark"):
        RerankConfig(rerank_history_low_mark=low_mark).validate()


def test_one_line_past_the_budget_moves_the_window_once_then_appends_reuse_every_full_block(stage):
    st = stage(**SMALL, rerank_history_low_mark=0.5)
    step = st.history_step
    assert step >= 8  # two chunks at least, or this test shows nothing the old rule did not
    uncut, line = _grow_until_cut(st, 1)
    assert len(uncut) + st.cfg.rerank_item_tokens <= 600
    assert len(_body(st, uncut)) + len(line) > st.history_budget  # one line past the budget
    # the one line too many moved the start by one step, to the low mark, not by one chunk
    assert _start(st, 1) == step
    prev, appended = st.context_ids(1, fit=True), 0
    while True:
        k = 1000 + appended
        st.history.add(1, k % 200, "click", k)
        ctx = st.context_ids(1, fit=True)
        if _start(st, 1) != step:
            break
        appended += 1
        assert ctx[:len(prev)] == prev  # only appended
        # a cache that held the previous context hands back all its full blocks: only the new
        # line and the previous context's partial last block are computed
        assert blocks_shared(prev, ctx) == len(prev) // 16 * 16
        prev = ctx
    # the window refills by about a step before it must move again (the old rule: one chunk)
    assert appended >= step - 2, (appended, step)
    assert _start(st, 1) == 2 * step  # and it moves by a step again


def test_the_window_start_is_a_function_of_the_history_alone(stage):
    # One user whose calls came after every interaction, one who was never called: the same
    # history renders the same context (no state from earlier calls), as racing calls need.
    called, fresh = stage(**SMALL), stage(**SMALL)
    items = [(int(i) * 7) % 200 for i in range(90)]
    for k, item in enumerate(items):
        called.history.add(5, item, "click", k)
        called.context_ids(5, fit=True)
    fresh.history.extend([(5, Interaction(item, "click", k)) for k, item in enumerate(items)])
    assert called.context_ids(5, fit=True) == fresh.context_ids(5, fit=True)
    assert called.context_ids(5, fit=True) == called.context_ids(5, fit=True)


def test_the_start_only_moves_forward_by_whole_steps_on_chunk_boundaries(stage):
    st = stage(**SMALL)
    starts = []
    for k in range(150):
        st.history.add(6, k % 200, "click", k)
        starts.append(_start(st, 6))
    assert all(b >= a for a, b in zip(starts, starts[1:]))
    assert all(s % st.history_step == 0 and s % st.cfg.rerank_history_chunk == 0 for s in starts)
    assert 0 < len(set(starts)) - 1 <= 150 // st.history_step + 1


def test_the_cut_lands_on_a_step_multiple_even_with_textless_items(stage):
    texts = {i: item_text(i) for i in range(200) if i % 5}  # every 5th item has no text
    st = stage(texts=texts, **SMALL)
    for k in range(70):
        st.history.add(2, k, "click", k)
    body = _body(st, st.context_ids(2, fit=True))
    assert body
    starts = [s for s in range(0, 70, st.history_step)
              if [t for k in range(s, 70) if k in texts for t in st.line_tokens(texts[k], "click")] == body]
    assert starts, "the cut is not at a step multiple"


def test_a_lower_low_mark_moves_the_window_less_and_shows_fewer_lines(stage):
    def run(low_mark: float) -> tuple[int, float]:
        st = stage(**SMALL, rerank_history_low_mark=low_mark)
        moves, shown, prev = 0, [], None
        for k in range(200):
            st.history.add(8, k % 200, "click", k)
            ctx = st.context_ids(8, fit=True)
            moves += prev is not None and ctx[:len(prev)] != prev
            shown.append(_shown_lines(st, 8))
            prev = ctx
        return moves, float(np.mean(shown))

    moves_hi, lines_hi = run(1.0)
    moves_lo, lines_lo = run(0.5)
    assert moves_lo * 2 <= moves_hi  # a step of 3 chunks instead of 1
    assert lines_lo < lines_hi  # the price: less history shown after a move

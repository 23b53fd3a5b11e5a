"""The rerank prompt's layout keeps a returning user's context a cached prefix.

Stage-level tests use the real tokenizer with no engine (fast); one test runs the real engine to
show the prefix cache hands the previous call's blocks back.
"""

from __future__ import annotations

import pytest

from tests.rerank.rerank_helpers import BLOCK, blocks_shared, item_text, tokens_shared


def test_a_new_interaction_only_appends_so_the_call_reuses_all_but_the_last_partial_block(stage):
    st = stage()
    for k in range(30):
        st.history.add(1, k, "click", k)
    before = st.context_ids(1, fit=True)
    st.history.add(1, 77, "click", 100)
    after = st.context_ids(1, fit=True)
    trailer = len(st._trailer)
    assert trailer <= 1  # no instruction after the history: it would be recomputed every call
    assert after[:len(before) - trailer] == before[:len(before) - trailer]
    new = len(st.line_tokens(item_text(77), "click"))
    # everything but the new line, the marker and the previous context's partial last block
    assert blocks_shared(before, after) >= len(after) - new - trailer - BLOCK


def test_a_candidate_completes_a_history_line_with_the_same_item_tokens(stage):
    st = stage()
    st.history.add(1, 5, "click", 0)
    ctx = st.context_ids(1)
    line, cand, mark = st.line_tokens(item_text(5), "click"), st.candidate_tokens(item_text(5)), st._mark
    assert ctx[-len(st._trailer):] == list(mark)  # the context ends by opening the next line
    assert line[:len(mark) + len(cand)] == mark + cand  # which a candidate completes as a history line


def test_a_truncated_item_text_keeps_its_line_s_kind_and_newline(stage):
    st = stage(rerank_item_tokens=6)
    long_text = "science fiction " * 20
    line = st.line_tokens(long_text, "purchase")
    kind = st._kind("purchase")
    assert line[-len(kind):] == kind and len(line) == len(st._mark) + 6 + len(kind)


def test_the_fit_cut_starts_at_a_chunk_multiple_in_absolute_positions_even_with_textless_items(stage):
    texts = {i: item_text(i) for i in range(200) if i % 5}  # every 5th item has no text
    st = stage(max_model_len=400, texts=texts, rerank_history=64, rerank_history_chunk=8)
    for k in range(60):
        st.history.add(2, k, "click", k)
    ctx = st.context_ids(2, fit=True)
    assert len(ctx) + st.cfg.rerank_item_tokens <= 400
    shown = len(ctx) - len(st._header) - len(st._trailer)
    # the shown lines are exactly those of interactions from some multiple of 8 on
    for start in range(0, 64, 8):
        tail = [t for k in range(start, 60) if k in texts for t in st.line_tokens(texts[k], "click")]
        if len(tail) == shown:
            assert ctx[len(st._header):len(ctx) - len(st._trailer)] == tail
            return
    pytest.fail("the cut is not at a chunk multiple")


@pytest.mark.parametrize("chunk", [8, 16])
def test_the_start_moves_at_most_once_per_chunk_of_new_interactions(stage, chunk):
    st = stage(max_model_len=600, rerank_history=64, rerank_history_chunk=chunk)
    for k in range(20):
        st.history.add(3, k % 200, "click", k)
    prev, moves = st.context_ids(3, fit=True), 0
    appends = 160
    for k in range(20, 20 + appends):
        st.history.add(3, k % 200, "click", k)
        ctx = st.context_ids(3, fit=True)
        t = len(st._trailer)
        moves += ctx[:len(prev) - t] != prev[:len(prev) - t]
        prev = ctx
    assert 0 < moves <= appends // chunk + 1, moves


def test_a_returning_user_s_second_call_reuses_every_token_of_the_first(runtime, serve_with):
    from serving.pb import pb2

    rt = runtime(rerank_top_n=8)
    for k in range(30):
        rt.history.add(9, k, "click", 1000 + k)
    stub = serve_with(rt)
    req = dict(user_id=9, candidate_item_ids=list(range(200)), top_k=8)
    first_ctx = rt.stage.context_ids(9, fit=True)
    stub.Recommend(pb2.RecommendRequest(**req))
    rt.history.add(9, 150, "click", 5000)
    second_ctx = rt.stage.context_ids(9, fit=True)
    tokens, cached = rt.stage.context_tokens, rt.stage.context_cached
    got = stub.Recommend(pb2.RecommendRequest(**req))
    assert got.reranked == 8 and not got.degraded
    assert rt.stage.context_tokens - tokens == len(second_ctx)
    # the cache held every token the two contexts share, the first one's partial last block too
    assert rt.stage.context_cached - cached == tokens_shared(first_ctx, second_ctx) == len(first_ctx)
    assert len(first_ctx) > blocks_shared(first_ctx, second_ctx)
    assert (rt.stage.context_cached - cached) / len(second_ctx) >= 0.9

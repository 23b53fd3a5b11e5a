"""Sanity of ranking with a real model (SmolLM2-135M-Instruct): sensible orders, cached or not."""

from __future__ import annotations

import pytest

from llm_engine import EngineConfig, LLMEngine
from llm_engine.convert import smollm2_path
from llm_engine.ranking import plan_request, score_sync
from llm_engine.scoring import ScoringOptions
from serving.http.tokenizer import ModelTokenizer

pytestmark = pytest.mark.slow

CASES = [
    ("I love science fiction: space battles, robots and faraway galaxies. Tonight I will watch",
     " Star Wars", " The Notebook"),
    ("My favourite books are about wizards, dragons and magic schools. Next I will read",
     " Harry Potter", " a tax law textbook"),
    ("For breakfast in Paris I ordered a coffee and a", " croissant", " lawnmower"),
    ("The user listens to heavy metal all day. Recommended band:", " Metallica", " the Vienna Boys Choir"),
]


@pytest.fixture(scope="module")
def smol():
    path = smollm2_path()
    return LLMEngine(path, EngineConfig(kv_cache_bytes=64 << 20)), ModelTokenizer(path)


@pytest.mark.parametrize("context, better, worse", CASES)
def test_the_fitting_candidate_ranks_first(smol, context, better, worse):
    engine, tok = smol
    opts = ScoringOptions(normalize="mean")
    items = plan_request(opts, context, [worse, better], tok.encode, tok.bos_token_id)
    res = score_sync(engine, items, opts, request_id=f"sanity-{better}")
    assert res.ranking == [1, 0], res.scores


def test_scores_with_a_cached_context_equal_scores_without(smol):
    engine, tok = smol
    context, better, worse = CASES[0]
    opts = ScoringOptions(normalize="sum")
    items = plan_request(opts, context * 3, [better, worse, " Alien", " Titanic"], tok.encode, tok.bos_token_id)
    first = score_sync(engine, items, opts, "cold")
    warm = score_sync(engine, items, opts, "warm")
    assert warm.cached_tokens > 0
    assert warm.scores == pytest.approx(first.scores, abs=1e-4)

"""Speculative decoding without a draft model.

:mod:`.ngram` proposes continuations by looking the request's latest tokens up in an n-gram index
over its own prompt and output (multi-branch, Lookahead-style); :mod:`.verify` accepts or rejects
them against the target model's distributions so the output is exactly what plain decoding would
give (greedy) or has the same distribution (sampled); :mod:`.adaptive` picks each request's draft
length from its measured acceptance and the batch's cost, down to zero when drafting does not pay.
"""

from llm_engine.spec.adaptive import DraftLengthController, SpecConfig, StepCostModel
from llm_engine.spec.ngram import DraftTree, NgramDrafter
from llm_engine.spec.proposer import SpeculativeProposer
from llm_engine.spec.verify import (
    VerifyResult,
    verify_greedy,
    verify_sampled,
    verify_tree_greedy,
    verify_tree_sampled,
)

__all__ = [
    "DraftLengthController",
    "DraftTree",
    "NgramDrafter",
    "SpecConfig",
    "SpeculativeProposer",
    "StepCostModel",
    "VerifyResult",
    "verify_greedy",
    "verify_sampled",
    "verify_tree_greedy",
    "verify_tree_sampled",
]

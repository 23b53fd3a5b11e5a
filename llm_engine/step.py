"""What one engine step passes between its phases, and the speculation hooks it calls.

:meth:`~llm_engine.engine.LLMEngine.step` runs five phases, each producing one record here:

1. schedule: the scheduler's decision plus which entries the sampler serves (:class:`StepPlan`);
2. prepare inputs and 3. run the model: hidden states of every scheduled token (:class:`ForwardPass`);
4. sample / verify: the step's new tokens, not yet appended (:class:`StepTokens`);
5. postprocess: append, check stop conditions, retire finished work (``RequestOutput`` list).

Speculative decoding plugs in through :class:`SpeculationHooks` at named points of that order.
The engine's plug-ins (speculation, the scoring manager) see it as an :class:`EngineCore`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from llm_engine.sequence import Sequence

if TYPE_CHECKING:
    from llm_engine.config import EngineConfig
    from llm_engine.kv_cache import KVCacheManager
    from llm_engine.model.llama import LlamaForCausalLM
    from llm_engine.model_runner import ModelRunner, StepInputs
    from llm_engine.scheduler import Scheduler, SchedulerOutput


@dataclass
class StepPlan:
    """What this step runs, and which of its entries get their next token from the sampler."""

    sched: SchedulerOutput
    sample_indices: list[int]  # entries of ``sched.scheduled``: generation chunks that reach the end, undrafted
    drafted: bool  # some entries carry drafts to verify


@dataclass
class ForwardPass:
    """The model's output for one step: hidden states ``[T, hidden]`` and the inputs they came from."""

    hidden: torch.Tensor
    inputs: StepInputs


@dataclass
class Verification:
    """Verified drafts: per drafted sequence the tokens to append (its accepted drafts, then one
    token from the target), and the logits of the extra rows projected in the same pass."""

    tokens: dict[Sequence, list[int]] = field(default_factory=dict)
    extra_logits: torch.Tensor | None = None


@dataclass
class SampledToken:
    """One token the sampler drew, with the log-probs its request asked for (``None``: none asked)."""

    seq: Sequence
    token_id: int
    logprobs: dict[int, float] | None = None


@dataclass
class StepTokens:
    """The step's new tokens, before any is appended: verified drafts first, then sampled tokens."""

    verified: dict[Sequence, list[int]] = field(default_factory=dict)
    sampled: list[SampledToken] = field(default_factory=list)


class EngineCore(Protocol):
    """The parts of :class:`~llm_engine.engine.LLMEngine` its plug-ins read and drive (a protocol,
    so that they need not import the engine that imports them)."""

    config: EngineConfig
    max_model_len: int
    model: LlamaForCausalLM
    scheduler: Scheduler
    kv: KVCacheManager
    runner: ModelRunner
    requests: dict[str, Sequence]  # live generation requests by id


class SpeculationHooks(Protocol):
    """Speculative decoding as the engine sees it, in the order one step calls it."""

    @property
    def drafts(self) -> Mapping[Sequence, list[int]]:
        """This step's drafts (after :meth:`fit_to_schedule`), appended to their sequences."""
        ...

    def propose_drafts(self) -> None:
        """Before scheduling: append a draft to each running sequence that speculates this step."""
        ...

    def fit_to_schedule(self, sched: SchedulerOutput) -> None:
        """After scheduling: drop the drafts the schedule does not run in full."""
        ...

    def verify(self, sched: SchedulerOutput, forward: ForwardPass,
               extra_rows: torch.Tensor | None = None) -> Verification:
        """Keeps each draft's accepted prefix, rolling its sequence back to it, and projects
        ``extra_rows`` (the sampler's rows) with the same LM-head pass."""
        ...

    def accept(self, sched: SchedulerOutput, verified: Mapping[Sequence, list[int]]) -> None:
        """After the new tokens are appended: feed them to the drafters, the step time to the cost model."""
        ...

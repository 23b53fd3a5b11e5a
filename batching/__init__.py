"""The batching core: a queue and a budgeted batch former with deadlines and priorities.

Neutral (no internal dependencies): the LLM step scheduler (:mod:`llm_engine.scheduler`) and the
recommender's micro-batcher (:mod:`serving.microbatch`) are two policies on it, so serving can
batch without importing the LLM engine.

Public API: :class:`QueueItem`, :class:`BatchQueue`, :func:`form_batch`; the serving runtime's
priority classes (:class:`Priority`) and the :class:`Arbiter` that turns its two engines' work.
"""

from batching.arbiter import Arbiter, Priority
from batching.core import BatchQueue, QueueItem, form_batch

__all__ = ["Arbiter", "BatchQueue", "Priority", "QueueItem", "form_batch"]

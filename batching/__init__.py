"""The batching core: a queue and a budgeted batch former with deadlines and priorities.

Neutral (no internal dependencies): the LLM step scheduler (:mod:`llm_engine.scheduler`) and the
recommender's micro-batcher (:mod:`serving.microbatch`) are two policies on it, so serving can
batch without importing the LLM engine.

Public API: :class:`QueueItem`, :class:`BatchQueue`, :func:`form_batch`; the serving runtime's
priority classes (:class:`Priority`) and the :class:`ComputeGate` between its two engines.
"""

from batching.core import BatchQueue, QueueItem, form_batch
from batching.priority import ComputeGate, Priority

__all__ = ["BatchQueue", "ComputeGate", "Priority", "QueueItem", "form_batch"]

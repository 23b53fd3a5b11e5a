"""Fills a model's ``recent_items`` slot from serving's live history (``serve --recent-items N``).

A model learned on a log with ``recent_items = N`` (:mod:`streams.log_history`) reads, per
request, the item ids of the user's last N positive rows before it. A Recommend call may send
them as context; when it does not, serving takes the user's last N interactions from its live
history (:class:`~serving.user_history.UserHistory`, fed from ``hw.actions``, where the replay
sends the log's positives as clicks), oldest first, as training made them: no train/serve skew.
A user serving has no history of reads as one without history, as their first request did in
training.
"""

from __future__ import annotations

import logging

import numpy as np

from serving.scoring_inputs import RankJob
from serving.user_history import UserHistory
from streams.log_history import RECENT_SLOT

__all__ = ["RECENT_SLOT", "fill_recent_items"]

_WARNED = False
log = logging.getLogger(__name__)


def fill_recent_items(job: RankJob, slots: tuple[str, ...], history: UserHistory | None, n: int) -> None:
    """Sets ``job.context[recent_items]`` to the user's last ``n`` interactions, unless the
    model has no such slot or the call sent it. Without a history (``serve`` without
    ``--recent-items``) such a call is scored as a user without history, with a warning once."""
    if RECENT_SLOT not in slots or RECENT_SLOT in job.context:
        return
    if history is None or n <= 0:
        global _WARNED
        if not _WARNED:
            _WARNED = True
            log.warning("the model has a %s slot but serving fills it from no history (serve "
                        "--recent-items N, the N of the log's schema): calls that do not send it "
                        "score as users without history", RECENT_SLOT)
        return
    recent, _ = history.recent(job.user_id)
    ids = np.fromiter((it.item_id for it in recent[-n:]), np.int64, min(n, len(recent)))
    job.context = {**job.context, RECENT_SLOT: ids}

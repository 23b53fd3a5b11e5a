"""A micro-batch's inputs are assembled in one step; the result equals scoring each job alone."""

import numpy as np

from serving.calibration import Calibrator
from serving.scoring import RankJob, score_jobs
from serving.testing import random_model


def test_mixed_context_bags_in_one_batch_score_like_each_job_alone():
    model = random_model(slots=("user_id", "item_id", "f00", "f01"), items=300, users=50, seed=4)
    jobs = [RankJob(user_id=1, items=np.arange(5)),
            RankJob(user_id=2, items=np.arange(10, 13), context={"f00": np.array([7, 8])}),
            RankJob(user_id=3, items=np.arange(20, 29), context={"user_id": np.array([40, 41]),
                                                                 "f01": np.array([3])}),
            RankJob(user_id=10**12, items=np.array([299, 10**9]), context={"f00": np.zeros(0, np.int64)})]
    together = score_jobs(model, jobs, Calibrator())
    assert [p.shape[0] for p in together] == [5, 3, 9, 2]
    for job, probs in zip(jobs, together):
        np.testing.assert_allclose(probs, score_jobs(model, [job], Calibrator())[0], rtol=1e-5, atol=1e-7)
    # the user slot's bag is the user id plus the request's own user-slot ids: extra ids change it
    alone = score_jobs(model, [RankJob(user_id=3, items=np.arange(20, 29), context={"f01": np.array([3])})],
                       Calibrator())[0]
    assert not np.allclose(alone, together[2])

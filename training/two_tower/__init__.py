"""A two-tower retrieval model trained online on the trainer's example batches.

User tower: user id + user-side slots + the mean of the user's last clicked items (kept online
in event-time order, never ahead of the row). Item tower: item id + item-side slots. Outputs are
L2-normalised; training is in-batch sampled softmax over clicks with a temperature and the logQ
correction for item popularity (Yi et al., RecSys 2019).

Not yet: publishing item vectors as deltas to serving, and an ANN index fed by them.
"""

from training.two_tower.learner import TwoTowerLearner, TwoTowerStats
from training.two_tower.model import TowerInputs, TwoTowerConfig, TwoTowerModel

__all__ = ["TwoTowerConfig", "TwoTowerLearner", "TwoTowerModel", "TwoTowerStats", "TowerInputs"]

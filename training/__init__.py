"""training: the online trainer and what serving needs from it.

Serving imports only :mod:`training.model` (the tower and ``score``), which pulls in nothing of the
training loop; the ``hw.params`` protocol both sides speak is :mod:`paramsync`. Importing this
package itself imports nothing heavy.
"""

__all__ = ["ModelConfig", "DenseTower", "TrainerConfig", "OnlineTrainer", "DeltaPublisher",
           "CheckpointStore", "PrequentialEvaluator"]

_WHERE = {
    "ModelConfig": "training.model", "DenseTower": "training.model",
    "TrainerConfig": "training.config", "OnlineTrainer": "training.trainer",
    "DeltaPublisher": "training.sync", "CheckpointStore": "training.checkpoint",
    "PrequentialEvaluator": "training.evaluation",
}


def __getattr__(name: str):  # lazy: `import training.model` must not import Kafka or the loop
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")

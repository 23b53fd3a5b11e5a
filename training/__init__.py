"""training: the online trainer and what serving needs from it.

Serving imports only :mod:`training.model` (the tower and ``score``), :mod:`training.params_wire`
(the ``hw.params`` envelope) and :mod:`training.params_reader` (bootstrap + replica); none of
them pulls in the training loop. Importing this package itself imports nothing heavy.
"""

__all__ = ["ModelConfig", "DenseTower", "TrainerConfig", "OnlineTrainer", "DeltaPublisher",
           "CheckpointStore", "PrequentialEvaluator", "ParamsMessage", "ReplicaState"]

_WHERE = {
    "ModelConfig": "training.model", "DenseTower": "training.model",
    "TrainerConfig": "training.config", "OnlineTrainer": "training.trainer",
    "DeltaPublisher": "training.sync", "CheckpointStore": "training.checkpoint",
    "PrequentialEvaluator": "training.evaluation", "ParamsMessage": "training.params_wire",
    "ReplicaState": "training.params_reader",
}


def __getattr__(name: str):  # lazy: `import training.model` must not import Kafka or the loop
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")

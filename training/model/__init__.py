"""The click model: pooled sparse slots and dense features -> DCN-v2 cross network + MLP (+ FM) -> logit.

Two halves with different owners: the *sparse* half is rows of an :mod:`embedding_store` table
(looked up per slot as bags, :mod:`training.model.bags`), the *dense* half is
:class:`DenseTower` (:mod:`training.model.tower`), an ordinary ``nn.Module``. Serving imports this
package to score with its replica table and the tower weights it receives on ``hw.params``;
nothing here touches Kafka or the training loop. The tower carries its :class:`ModelConfig`
(:mod:`training.model.config`) inside its safetensors bytes (:mod:`training.model.tower_io`), so
a consumer can rebuild it from one message. Crossed slots are :mod:`training.model.crosses`.
"""

from training.model.bags import BagTable, RaggedLike, SlotBags, bag_grads_to_ids, lookup_slots
from training.model.config import ModelConfig, ModelFields
from training.model.crosses import (Bags, cross_bags, cross_name, cross_parts, user_item_crosses,
                                    with_cross_bags)
from training.model.device import resolve_device
from training.model.inference import score
from training.model.loss import weighted_bce
from training.model.tower import DenseTower, bf16_supported, init_bias_for_ctr
from training.model.tower_io import tower_from_safetensors, tower_to_safetensors

__all__ = ["cross_name", "cross_parts", "user_item_crosses", "cross_bags", "with_cross_bags", "Bags",
           "ModelFields", "ModelConfig", "DenseTower", "SlotBags", "BagTable", "RaggedLike",
           "lookup_slots", "bag_grads_to_ids", "weighted_bce", "score", "tower_to_safetensors",
           "tower_from_safetensors", "bf16_supported", "init_bias_for_ctr", "resolve_device"]

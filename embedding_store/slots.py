"""Per-slot configuration: every feature slot has its own dim, initializer, optimizer, TTL and
admission threshold (Monolith's per-slot occurrence threshold and expiry)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

OPTIMIZERS = ("sgd", "adagrad", "ftrl", "adam")
INITIALIZERS = ("normal", "uniform", "zeros")


@dataclass(slots=True)
class SlotConfig:
    """One feature slot of an :class:`EmbeddingTable`."""

    name: str
    dim: int
    optimizer: str = field(default="adagrad", metadata={"help": "sgd | adagrad | ftrl | adam"})
    lr: float = field(default=0.05, metadata={"help": "learning rate (FTRL: alpha)"})
    init_std: float = field(default=0.01, metadata={"help": "std (normal) or half-width (uniform)"})
    initializer: str = field(default="normal", metadata={"help": "normal | uniform | zeros"})
    ttl_s: float | None = field(default=None, metadata={"help": "expire rows not updated for this long"})
    admit_threshold: int = field(default=1, metadata={"help": "sightings before an id gets a row"})
    default_value: float = field(default=0.0, metadata={"help": "what unknown/unadmitted ids read"})
    counter_columns: int = field(default=0, metadata={
        "help": "last columns of each row that are counters, not weights: they start at 0 and "
                "apply_gradients adds their 'gradient' as is (no optimizer)"})
    # optimizer hyper-parameters
    eps: float = 1e-10
    initial_accumulator: float = 0.0
    # FTRL's beta keeps the first steps small: a step is lr * g / (beta + sqrt(sum g^2)). The
    # paper's 1.0 suits per-example gradients of order 1; a row's gradient here is a mini-batch
    # mean (order 1e-4), against which beta = 1 made every step ~1e4 times too small (AUC 0.5).
    ftrl_beta: float = 1e-6
    ftrl_l1: float = 0.0
    ftrl_l2: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # count-min sketch size (only used when admit_threshold > 1)
    sketch_width: int = 1 << 20
    sketch_depth: int = 4

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"slot name must be non-empty and contain no '/': {self.name!r}")
        if self.dim <= 0:
            raise ValueError(f"slot {self.name}: dim must be positive, got {self.dim}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"slot {self.name}: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.initializer not in INITIALIZERS:
            raise ValueError(f"slot {self.name}: initializer must be one of {INITIALIZERS}")
        if self.admit_threshold < 1:
            raise ValueError(f"slot {self.name}: admit_threshold must be >= 1")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ValueError(f"slot {self.name}: ttl_s must be positive or None")
        if self.lr <= 0:
            raise ValueError(f"slot {self.name}: lr must be positive")
        if not 0 <= self.counter_columns < self.dim:
            raise ValueError(f"slot {self.name}: counter_columns must be in [0, dim)")

    @property
    def weight_dim(self) -> int:
        """Columns the optimizer updates (the row minus its counter columns)."""
        return self.dim - self.counter_columns

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SlotConfig":
        return cls(**json.loads(text))

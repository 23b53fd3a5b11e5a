"""The model's shape: :class:`ModelFields` (what a user chooses, shared with the trainer's
config) and :class:`ModelConfig` (those plus what the data fixes: slots and dense width).

``headwater train`` takes every :class:`ModelFields` field as a flag and a TOML key through
``TrainerConfig``, which inherits them: the fields, their defaults and their help live here once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

__all__ = ["POOLINGS", "ModelFields", "ModelConfig", "model_field"]

POOLINGS = ("sum", "mean")


@dataclass
class ModelFields:
    """The click model's hyper-parameters: everything of its shape but slots and dense width."""

    crosses: tuple[str, ...] = field(default=(), metadata={
        "help": "crossed slots 'a*b' (comma list), e.g. user_id*genres: one row per pair of ids, "
                "derived where rows are scored, in training and serving alike (training.model.crosses)"})
    embedding_dim: int = field(default=16, metadata={"help": "embedding dim of every slot"})
    hidden: tuple[int, ...] = field(default=(256, 128, 64), metadata={"help": "MLP layer widths"})
    cross_layers: int = field(default=2, metadata={"help": "DCN-v2 cross layers (0 disables)"})
    cross_rank: int = field(default=32, metadata={"help": "low-rank factor of each cross layer (0 = full rank)"})
    use_fm: bool = field(default=True, metadata={"help": "add the factorisation-machine pairwise term"})
    fm_pair_weights: bool = field(default=True, metadata={
        "help": "field-weighted FM (Pan et al., WWW 2018): one learned weight per slot pair, so a "
                "pair that is noise (e.g. a rare user id with everything) is turned down"})
    pooling: str = field(default="sum", metadata={
        "help": "bag pooling (sum or mean) of every slot that slot_pooling does not name"})
    slot_pooling: tuple[str, ...] = field(default=(), metadata={
        "help": "per-slot bag pooling, 'slot=sum' or 'slot=mean' (comma list); a crossed slot not "
                "named pools as its named parts (mean if either is mean)"})
    wide: bool = field(default=False, metadata={
        "help": "one column of every slot row is that id's own logit weight (the wide part)"})
    wide_scale: float = field(default=1.0, metadata={"help": "multiplier of the wide weights in the logit"})
    counters: bool = field(default=False, metadata={
        "help": "per-id click counters: the last two columns of every slot row count the id's "
                "(weighted) positives and examples; their smoothed log-odds join the logit"})
    count_prior: float = field(default=5.0, metadata={
        "help": "pseudo-examples at the global rate that smooth every id's count log-odds"})

    def validate_fields(self) -> None:
        """Checks what can be checked without the slots."""
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be sum or mean, got {self.pooling!r}")
        self.pooling_overrides()
        if self.count_prior <= 0:
            raise ValueError("count_prior must be positive")

    def pooling_overrides(self) -> dict[str, str]:
        """``slot_pooling`` as a mapping; ValueError naming a malformed entry."""
        out: dict[str, str] = {}
        for entry in self.slot_pooling:
            slot, sep, mode = entry.rpartition("=")
            if not sep or not slot or mode not in POOLINGS:
                raise ValueError(f"slot_pooling entries are 'slot=sum' or 'slot=mean', got {entry!r}")
            if slot in out:
                raise ValueError(f"slot_pooling names slot {slot!r} twice")
            out[slot] = mode
        return out

    def model_fields(self) -> dict[str, Any]:
        """This object's :class:`ModelFields` values (also when it is a ``TrainerConfig``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelFields)}

    def model_config(self, slots: Sequence[str], dense_dim: int) -> "ModelConfig":
        """The :class:`ModelConfig` of a model over ``slots`` with ``dense_dim`` dense features."""
        return ModelConfig(slots=tuple(slots), dense_dim=dense_dim, **self.model_fields())


def model_field(name: str, default: Any) -> Any:
    """The :class:`ModelFields` field ``name`` (its help) with another default, for a config
    class that inherits the fields but wants its own default (the trainer learns with counters)."""
    base = ModelFields.__dataclass_fields__[name]
    return field(default=default, metadata=base.metadata)


@dataclass
class ModelConfig(ModelFields):
    """Shape of the click model; the same object is shipped with the dense weights."""

    slots: tuple[str, ...] = field(default=(), metadata={"help": "sparse slot names, in model order"})
    dense_dim: int = field(default=0, metadata={"help": "width of the dense feature vector"})

    def validate(self) -> None:
        if len(set(self.slots)) != len(self.slots):
            raise ValueError(f"duplicate slot names in {self.slots}")
        if self.factor_dim <= 0 or self.dense_dim < 0 or self.cross_layers < 0 or self.cross_rank < 0:
            raise ValueError("embedding_dim must leave factor columns after the wide and counter "
                             "columns; dense_dim, cross_layers, cross_rank >= 0")
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"hidden widths must be positive, got {self.hidden}")
        self.validate_fields()
        for name in self.crosses:
            parts = name.partition("*")[::2]
            if name not in self.slots or not all(p and p in self.slots for p in parts):
                raise ValueError(f"cross {name!r} and both its parts must be slots of the model")
        unknown = sorted(set(self.pooling_overrides()) - set(self.slots))
        if unknown:
            raise ValueError(f"slot_pooling names slots the model does not have: {unknown}")

    def pooling_of(self, slot: str) -> str:
        """How ``slot``'s bags are pooled: its ``slot_pooling`` entry; for a crossed slot without
        one, as its parts that have entries (mean if either of those is mean); else ``pooling``."""
        given = self.pooling_overrides()
        if slot in given:
            return given[slot]
        if slot in self.crosses:
            parts = [given[p] for p in slot.partition("*")[::2] if p in given]
            if parts:
                return "mean" if "mean" in parts else "sum"
        return self.pooling

    def slot_poolings(self) -> tuple[str, ...]:
        """The pooling of every slot, in model order (training and serving pool with these)."""
        return tuple(self.pooling_of(s) for s in self.slots)

    @property
    def factor_dim(self) -> int:
        """Columns of a slot row that feed the cross net, MLP and FM.

        A row is laid out ``[factors | wide weight | positives, examples]``, the last two parts
        present when ``wide`` / ``counters`` are on.
        """
        return self.embedding_dim - int(self.wide) - 2 * int(self.counters)

    @property
    def counter_columns(self) -> int:
        """Trailing row columns that are counters (the table adds to them, no optimizer)."""
        return 2 if self.counters else 0

    @property
    def input_dim(self) -> int:
        """Width of the cross net's input: factors, dense features, and per slot the count
        log-odds and log count when counters are on."""
        return len(self.slots) * (self.factor_dim + self.counter_columns) + self.dense_dim

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("model config JSON must be an object")
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        # A config written before pair weights existed describes a model without them.
        known.setdefault("fm_pair_weights", False)
        for key in ("slots", "hidden", "crosses", "slot_pooling"):
            if key in known:
                known[key] = tuple(known[key])
        cfg = cls(**known)
        cfg.validate()
        return cfg

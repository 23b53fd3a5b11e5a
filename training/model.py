"""The click model: pooled sparse slots and dense features -> DCN-v2 cross network + MLP (+ FM) -> logit.

Two halves with different owners: the *sparse* half is rows of an :class:`embedding_store`
table (looked up per slot as bags), the *dense* half is :class:`DenseTower`, an ordinary
``nn.Module``. Serving imports this module to score with its replica table and the tower weights
it receives on ``hw.params``; nothing here touches Kafka or the training loop. The tower carries
its :class:`ModelConfig` inside its safetensors bytes, so a consumer can rebuild it from one
message.

Training keeps the table out of autograd on purpose: :func:`lookup_slots` reads bags under
``no_grad`` and returns leaf tensors with ``requires_grad``; after ``backward`` the bag gradients
are expanded to the ids they pooled (:func:`bag_grads_to_ids`) and handed to the table's own
per-row optimizers. Only touched rows change, which is what makes delta sync small.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from hashing import mix64

__all__ = ["cross_name", "cross_parts", "user_item_crosses", "cross_bags", "with_cross_bags", "Bags", "ModelConfig", "DenseTower", "SlotBags", "lookup_slots", "bag_grads_to_ids",
           "weighted_bce", "score", "tower_to_safetensors", "tower_from_safetensors", "bf16_supported"]


@dataclass
class ModelConfig:
    """Shape of the click model; the same object is shipped with the dense weights."""

    slots: tuple[str, ...] = field(default=(), metadata={"help": "sparse slot names, in model order"})
    embedding_dim: int = field(default=16, metadata={"help": "embedding dim of every slot"})
    dense_dim: int = field(default=0, metadata={"help": "width of the dense feature vector"})
    cross_layers: int = field(default=2, metadata={"help": "DCN-v2 cross layers (0 disables)"})
    cross_rank: int = field(default=32, metadata={"help": "low-rank factor of each cross layer (0 = full)"})
    hidden: tuple[int, ...] = field(default=(256, 128, 64), metadata={"help": "MLP layer widths"})
    use_fm: bool = field(default=True, metadata={"help": "add a factorisation-machine pairwise term"})
    pooling: str = field(default="sum", metadata={"help": "bag pooling: sum or mean"})
    wide: bool = field(default=False, metadata={
        "help": "one column of every slot row is that id's own logit weight (the wide part)"})
    wide_scale: float = field(default=1.0, metadata={"help": "multiplier of the wide weights in the logit"})
    counters: bool = field(default=False, metadata={
        "help": "the last two columns of every slot row count the id's (weighted) positives and "
                "examples; the tower adds their smoothed log-odds to the logit"})
    crosses: tuple[str, ...] = field(default=(), metadata={
        "help": "crossed slots ('a*b', both parts in slots, the cross itself too): their bags are "
                "derived from the parts' bags (training.crosses) wherever a row is scored"})
    count_prior: float = field(default=5.0, metadata={
        "help": "pseudo-examples at the global rate that smooth every id's count log-odds"})

    def validate(self) -> None:
        if len(set(self.slots)) != len(self.slots):
            raise ValueError(f"duplicate slot names in {self.slots}")
        if self.factor_dim <= 0 or self.dense_dim < 0 or self.cross_layers < 0 or self.cross_rank < 0:
            raise ValueError("embedding_dim must leave factor columns after the wide and counter "
                             "columns; dense_dim, cross_layers, cross_rank >= 0")
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"hidden widths must be positive, got {self.hidden}")
        if self.pooling not in ("sum", "mean"):
            raise ValueError(f"pooling must be sum or mean, got {self.pooling!r}")
        if self.count_prior <= 0:
            raise ValueError("count_prior must be positive")
        for name in self.crosses:
            parts = name.partition("*")[::2]
            if name not in self.slots or not all(p and p in self.slots for p in parts):
                raise ValueError(f"cross {name!r} and both its parts must be slots of the model")

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
        for key in ("slots", "hidden", "crosses"):
            if key in known:
                known[key] = tuple(known[key])
        cfg = cls(**known)
        cfg.validate()
        return cfg


def bf16_supported() -> bool:
    """True when this CPU has native bfloat16 matmuls (AVX512-BF16 / AMX) for oneDNN.

    Training's ``dense_precision=auto`` and serving's ``precision=auto`` both ask this.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class _Cross(nn.Module):
    """One DCN-v2 cross layer: ``x0 * (W x + b) + x``, W optionally low-rank (U V^T)."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        if rank and rank < dim:
            self.proj = nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim))
        else:
            self.proj = nn.Linear(dim, dim)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x, x0, self.proj(x))  # one fused pass instead of mul + add


class DenseTower(nn.Module):
    """Everything of the model that is not an embedding row: cross net, MLP, FM term, bias.

    Input: ``emb`` float32[B, S, D] (pooled bag per slot, in ``cfg.slots`` order) and ``dense``
    float32[B, dense_dim]. Output: logits float32[B].
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.input_dim
        # Dense features vary wildly in scale; a LayerNorm keeps the cross products tame.
        self.dense_norm = nn.LayerNorm(cfg.dense_dim) if cfg.dense_dim else None
        self.cross = nn.ModuleList(_Cross(d, cfg.cross_rank) for _ in range(cfg.cross_layers))
        layers: list[nn.Module] = []
        width = d
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)
        # Standard FM (scale 1) from the start: a zero scale would also zero the FM gradient
        # reaching the embeddings, and pairwise affinity would be learned only through the MLP.
        self.fm_scale = nn.Parameter(torch.ones(())) if cfg.use_fm else None
        if cfg.counters:
            self.count_weight = nn.Parameter(torch.full((len(cfg.slots),), 0.5))
            # The global click rate the count log-odds shrink toward (set from the first batch).
            self.register_buffer("prior_logit", torch.zeros(()))

    def forward(self, emb: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        b = emb.shape[0]
        f = cfg.factor_dim
        factors = emb[:, :, :f]
        parts = [factors.reshape(b, -1)]
        extra = torch.zeros(b, dtype=emb.dtype, device=emb.device)
        if cfg.wide:
            extra = extra + emb[:, :, f].sum(dim=1) * cfg.wide_scale
        if cfg.counters:
            log_odds, log_count = self.count_features(emb[:, :, -2], emb[:, :, -1])
            extra = extra + (log_odds * self.count_weight).sum(dim=1)
            parts += [log_odds, log_count]
        if self.dense_norm is not None:
            if dense is None or dense.shape != (b, cfg.dense_dim):
                raise ValueError(f"dense features must be [{b}, {cfg.dense_dim}]")
            parts.append(self.dense_norm(dense))
        x0 = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        logit = self.head(self.mlp(x)).squeeze(1)
        if self.fm_scale is not None and factors.shape[1] > 1:
            # FM: sum over slot pairs of <e_i, e_j> = ((sum e)^2 - sum e^2) / 2.
            s = factors.sum(dim=1)
            fm = 0.5 * (s.pow(2) - factors.pow(2).sum(dim=1)).sum(dim=1)
            logit = logit + self.fm_scale * fm
        return logit + extra

    def count_features(self, positives: torch.Tensor, examples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per slot: the id's click log-odds, smoothed toward the global rate and relative to it
        (0 for an unseen id), and log(1 + examples), its confidence.

        The smoothing adds pseudo-examples at the global rate (a Beta prior: ``count_prior`` of
        them at a rate of 1/2, more for rarer clicks),
        the estimate that per-id counting baselines use; with weight 1 per slot the logit starts
        as counting's score, and the tower learns how much to trust each slot.
        """
        p0 = torch.sigmoid(self.prior_logit)
        # count_prior pseudo-examples at a rate of 1/2; rarer clicks need proportionally more
        # (the same prior variance of the log-odds at any base rate).
        a = self.cfg.count_prior / (4 * p0 * (1 - p0))
        negatives = (examples - positives).clamp(min=0.0)
        log_odds = torch.log((positives.clamp(min=0.0) + a * p0) / (negatives + a * (1 - p0))) - self.prior_logit
        return log_odds, torch.log1p(examples.clamp(min=0.0))


# -- crossed slots -----------------------------------------------------------------------------
# A crossed slot (``a*b``, e.g. ``user_id*genres``: a user's taste for a genre) holds one id per
# pair of ids of its two parts. It is an ordinary slot of the model (its own rows, counters and
# factors); only its bags are derived, from the parts' bags, wherever a row is scored (training
# and serving call the same function). The id of a pair is ``mix64(mix64(a) ^ b)`` (splitmix64's
# finaliser, :func:`hashing.mix64`): stable across processes and runs.

_SEP = "*"


def cross_name(a: str, b: str) -> str:
    """The slot name of the cross of slots ``a`` and ``b``."""
    return f"{a}{_SEP}{b}"


def user_item_crosses(item_slots: Sequence[str], user_slot: str = "user_id") -> tuple[str, ...]:
    """The crossed slots a real log gets by default: the user with every item-side categorical
    or multi-valued column (a user's rate within a genre, a brand, ...)."""
    return tuple(cross_name(user_slot, s) for s in item_slots)


def cross_parts(name: str) -> tuple[str, str]:
    """The two slots a crossed slot name joins; ValueError for anything else."""
    a, sep, b = name.partition(_SEP)
    if not sep or not a or not b or _SEP in b:
        raise ValueError(f"a crossed slot is named 'a{_SEP}b', got {name!r}")
    return a, b


def cross_bags(a_values: np.ndarray, a_lengths: np.ndarray, b_values: np.ndarray,
               b_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ids of every pair (one id of bag a, one of bag b): (values int64, lengths).

    Both sides have one bag per row; a row with an empty bag on either side gets an empty bag.
    """
    la = np.asarray(a_lengths, np.int64)
    lb = np.asarray(b_lengths, np.int64)
    if la.shape != lb.shape:
        raise ValueError(f"cross of {la.shape[0]} and {lb.shape[0]} bags")
    pairs = la * lb
    total = int(pairs.sum())
    if total == 0:
        return np.zeros(0, np.int64), pairs
    row = np.repeat(np.arange(len(la)), pairs)
    k = np.arange(total) - np.repeat(np.cumsum(pairs) - pairs, pairs)
    oa = np.cumsum(la) - la
    ob = np.cumsum(lb) - lb
    a = np.asarray(a_values, np.int64)[oa[row] + k // lb[row]]
    b = np.asarray(b_values, np.int64)[ob[row] + k % lb[row]]
    with np.errstate(over="ignore"):
        ids = mix64(mix64(a.view(np.uint64)) ^ b.view(np.uint64)).view(np.int64)
    return ids, pairs


@dataclass
class Bags:
    """One slot's bags of a batch: ``values`` int64[m] concatenated, ``lengths[i]`` ids for row i."""

    values: np.ndarray
    lengths: np.ndarray


def with_cross_bags(sparse: Mapping[str, Any], crosses: Sequence[str], n: int) -> dict[str, Any]:
    """``sparse`` (slot -> bags with ``values`` and ``lengths``) plus every crossed slot's bags
    (a missing part: ``n`` empty bags), as training and serving both derive them."""
    out = dict(sparse)
    for name in crosses:
        a, b = (sparse.get(p) for p in cross_parts(name))
        if a is None or b is None:
            out[name] = Bags(np.zeros(0, np.int64), np.zeros(n, np.int32))
            continue
        values, lengths = cross_bags(a.values, a.lengths, b.values, b.lengths)
        out[name] = Bags(values, lengths.astype(np.int32))
    return out


class BagTable(Protocol):
    """The part of ``embedding_store.EmbeddingTable`` the model needs (duck-typed on purpose)."""

    def lookup_bags(self, slot: str, ids: torch.Tensor, offsets_or_lengths: torch.Tensor,
                    mode: str = "sum", train: bool = False, **kw: Any) -> torch.Tensor: ...


class RaggedLike(Protocol):
    values: np.ndarray
    lengths: np.ndarray


@dataclass
class SlotBags:
    """One batch's pooled embeddings as a leaf tensor, plus what is needed to route its gradient."""

    emb: torch.Tensor  # float32[B, S, D], leaf (requires_grad when training)
    ids: list[torch.Tensor]  # per slot: int64[m_s]
    lengths: list[torch.Tensor]  # per slot: int64[B]


def lookup_slots(table: BagTable, slots: Sequence[str], sparse: Mapping[str, RaggedLike],
                 batch_size: int, pooling: str = "sum", train: bool = False,
                 now: float | None = None) -> SlotBags:
    """Pools each slot's bag from ``table`` under ``no_grad``; a slot absent from ``sparse`` is empty."""
    pooled, all_ids, all_lengths = [], [], []
    with torch.no_grad():
        for slot in slots:
            bag = sparse.get(slot)
            if bag is None:
                ids = torch.zeros(0, dtype=torch.int64)
                lengths = torch.zeros(batch_size, dtype=torch.int64)
            else:
                ids = torch.from_numpy(np.ascontiguousarray(bag.values, dtype=np.int64))
                lengths = torch.from_numpy(np.ascontiguousarray(bag.lengths)).to(torch.int64)
                if lengths.shape[0] != batch_size:
                    raise ValueError(f"slot {slot!r} has {lengths.shape[0]} bags for {batch_size} rows")
            kw: dict[str, Any] = {"mode": pooling, "train": train}
            if train and now is not None:
                kw["now"] = now
            pooled.append(table.lookup_bags(slot, ids, lengths, **kw))
            all_ids.append(ids)
            all_lengths.append(lengths)
    emb = torch.stack(pooled, dim=1) if pooled else torch.zeros(batch_size, 0, 1)
    emb = emb.float().contiguous()
    if train:
        emb.requires_grad_(True)
    return SlotBags(emb, all_ids, all_lengths)


def bag_grads_to_ids(bag_grad: torch.Tensor, lengths: torch.Tensor,
                     pooling: str = "sum") -> torch.Tensor:
    """Expands per-bag gradients float32[B, D] to the ids they pooled: float32[sum(lengths), D].

    For sum pooling every id of a bag receives the bag's gradient; for mean, divided by the
    bag length. Duplicate ids are left for the table to sum.
    """
    grads = torch.repeat_interleave(bag_grad, lengths, dim=0)
    if pooling == "mean":
        scale = torch.repeat_interleave(1.0 / lengths.clamp(min=1).to(bag_grad.dtype), lengths)
        grads = grads * scale.unsqueeze(1)
    return grads


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor,
                 sample_rate: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE with each example weighted by 1/sample_rate.

    Negatives kept with probability r stand for 1/r negatives, so the weighted loss is an unbiased
    estimate of the loss on the full stream and the logits come out calibrated: serving needs no
    log-odds correction.
    """
    if sample_rate is None:
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)
    w = 1.0 / sample_rate.clamp(min=1e-6)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, weight=w, reduction="sum")
    return loss / w.sum()


def score(table: BagTable, tower: DenseTower, sparse: Mapping[str, RaggedLike],
          dense: np.ndarray | None, batch_size: int) -> torch.Tensor:
    """Click probabilities float32[B] for one columnar batch (serving's entry point)."""
    cfg = tower.cfg
    bags = lookup_slots(table, cfg.slots, with_cross_bags(sparse, cfg.crosses, batch_size),
                        batch_size, cfg.pooling, train=False)
    dense_t = None
    if cfg.dense_dim:
        if dense is None:
            raise ValueError(f"model needs {cfg.dense_dim} dense features")
        dense_t = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))
    with torch.no_grad():
        return torch.sigmoid(tower(bags.emb, dense_t))


_CONFIG_KEY = "headwater.model_config"


def tower_to_safetensors(tower: DenseTower, metadata: Mapping[str, str] | None = None) -> bytes:
    """The tower's weights as safetensors bytes, its :class:`ModelConfig` in the metadata."""
    from safetensors.torch import save

    meta = {_CONFIG_KEY: tower.cfg.to_json(), **(metadata or {})}
    tensors = {k: v.detach().contiguous() for k, v in tower.state_dict().items()}
    return save(tensors, metadata=meta)


def tower_from_safetensors(data: bytes) -> tuple[DenseTower, dict[str, str]]:
    """Rebuilds a tower from :func:`tower_to_safetensors` bytes; returns it and the metadata."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        meta = _safetensors_metadata(data)
    except Exception as exc:  # safetensors raises its own error types on garbage
        raise ValueError(f"not a safetensors tower: {exc}") from None
    if _CONFIG_KEY not in meta:
        raise ValueError("safetensors bytes carry no model config")
    try:
        cfg = ModelConfig.from_json(meta[_CONFIG_KEY])
        # Shapes first, on the meta device (no memory): a forged config must not make us
        # allocate layers far larger than the weights the message actually carries.
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in DenseTower(cfg).state_dict().items()}
    except Exception as exc:  # noqa: BLE001 - any malformed config is one verdict
        raise ValueError(f"safetensors bytes carry an invalid model config: {exc}") from None
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != got:
        missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        bad = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise ValueError(f"tower weights do not match config: missing {missing}, unexpected {unexpected}, "
                         f"wrong shape {bad}")
    tower = DenseTower(cfg)
    tower.load_state_dict(tensors, strict=True)
    return tower, meta


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """Reads the ``__metadata__`` of safetensors bytes (8-byte length + JSON header)."""
    if len(data) < 8:
        raise ValueError("truncated safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("truncated safetensors header")
    header = json.loads(data[8:8 + n])
    return dict(header.get("__metadata__") or {})


def init_bias_for_ctr(tower: DenseTower, ctr: float) -> None:
    """Starts the head's bias at the prior log-odds, so early losses are not wasted on the mean."""
    ctr = min(max(ctr, 1e-4), 1 - 1e-4)
    with torch.no_grad():
        tower.head.bias.fill_(math.log(ctr / (1 - ctr)))
        if tower.cfg.counters:
            tower.prior_logit.fill_(math.log(ctr / (1 - ctr)))

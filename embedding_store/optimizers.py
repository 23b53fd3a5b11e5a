"""Sparse optimizers: update only the touched rows, with per-row state kept beside each row.

Each function takes the *gathered* rows (``w`` and its state tensors, shape ``[u, dim]``, one per
distinct id, gradients already summed over duplicates) and updates them in place; the table
scatters them back. Element-wise maths only, so one implementation serves CPU and CUDA.
"""

from __future__ import annotations

import torch

from embedding_store.slots import SlotConfig

# Optimizer -> names of its per-row state tensors (each [rows, dim] float32, except "step").
STATE_NAMES: dict[str, tuple[str, ...]] = {
    "sgd": (),
    "adagrad": ("accum",),
    "ftrl": ("z", "n"),
    "adam": ("m", "v", "step"),
}


def state_shapes(cfg: SlotConfig) -> dict[str, tuple[int, ...]]:
    """Per-row shape of each state tensor (``step`` is one counter per row)."""
    return {name: (() if name == "step" else (cfg.dim,)) for name in STATE_NAMES[cfg.optimizer]}


def initial_state_value(cfg: SlotConfig, name: str) -> float:
    return cfg.initial_accumulator if name == "accum" else 0.0


def sparse_update(cfg: SlotConfig, w: torch.Tensor, state: dict[str, torch.Tensor], g: torch.Tensor) -> None:
    """Apply one optimizer step to gathered rows ``w`` (in place) given summed grads ``g``."""
    if cfg.optimizer == "sgd":
        w.sub_(cfg.lr * g)
    elif cfg.optimizer == "adagrad":
        acc = state["accum"]
        acc.addcmul_(g, g)
        w.addcdiv_(g, acc.sqrt().add_(cfg.eps), value=-cfg.lr)
    elif cfg.optimizer == "ftrl":
        _ftrl(cfg, w, state["z"], state["n"], g)
    elif cfg.optimizer == "adam":
        _adam(cfg, w, state, g)
    else:  # pragma: no cover - SlotConfig validates
        raise ValueError(cfg.optimizer)


def _ftrl(cfg: SlotConfig, w: torch.Tensor, z: torch.Tensor, n: torch.Tensor, g: torch.Tensor) -> None:
    """FTRL-Proximal (McMahan et al. 2013, per-coordinate learning rates).

    The weights are a function of the state ``(z, n)``, and the paper starts every weight at 0.
    Embedding rows start random (a factorisation needs that: a factor's gradient is the other
    factors), so a coordinate's ``z`` is first set to the value whose solution is the row's
    current weight; without it the first update replaced the initialisation with about
    ``-alpha * g / beta`` and the factors never left zero.
    """
    alpha = cfg.lr
    fresh = n == 0
    if bool(fresh.any()):
        # -z = w * ((beta + sqrt(0)) / alpha + l2) + sign(w) * l1 reproduces w in the update below.
        start = -(w * (cfg.ftrl_beta / alpha + cfg.ftrl_l2) + torch.sign(w) * cfg.ftrl_l1)
        z.copy_(torch.where(fresh, start, z))
    n_new = n + g * g
    sigma = (n_new.sqrt() - n.sqrt()) / alpha
    z.add_(g - sigma * w)
    n.copy_(n_new)
    denom = (cfg.ftrl_beta + n.sqrt()) / alpha + cfg.ftrl_l2
    shrunk = -(z - torch.sign(z) * cfg.ftrl_l1) / denom
    w.copy_(torch.where(z.abs() <= cfg.ftrl_l1, torch.zeros_like(w), shrunk))


def _adam(cfg: SlotConfig, w: torch.Tensor, state: dict[str, torch.Tensor], g: torch.Tensor) -> None:
    """Lazy Adam: moments and the bias-correction step count are per row, so a rarely seen id
    is not penalised by the global step count of frequent ones."""
    m, v, step = state["m"], state["v"], state["step"]
    step.add_(1)
    b1, b2 = cfg.adam_beta1, cfg.adam_beta2
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    bc1 = (1 - b1 ** step).unsqueeze(1)
    bc2 = (1 - b2 ** step).unsqueeze(1)
    w.sub_(cfg.lr * (m / bc1) / ((v / bc2).sqrt() + cfg.adam_eps))

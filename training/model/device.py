"""Where the model lives: the ``device`` option of the trainer and of the serving replica.

One check for both (a name torch knows, and a GPU that is really there), so a bad ``--device``
fails at start with a sentence, not at the first batch with a device-mismatch traceback.
"""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device) -> torch.device:
    """``name`` ("cpu", "cuda", "cuda:N") as a ``torch.device``; ``ValueError`` for any other
    name, and for CUDA where ``torch.cuda.is_available()`` is false or the index is absent."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch.cuda.is_available() is false (no GPU, or a "
                         "CPU-only torch build); use device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev

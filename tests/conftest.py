"""Suite-wide set-up. Triton kernels run under the interpreter when no CUDA GPU is present."""

import os

try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _cuda = False
if not _cuda:
    # Must be set before triton is imported anywhere in the process.
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Pure-decode steps through captured CUDA graphs, padded to a few batch sizes.

A decode step of a small model is bound by kernel-launch overhead; a CUDA graph replays the whole
forward with one launch, but only on the tensors (addresses, shapes) it was captured with. So
:class:`PaddedDecode` owns static input buffers at the largest size, and for a step of ``n``
sequences picks the smallest captured size ``b >= n``, copies the step's inputs into rows
``[0, n)``, makes rows ``[n, b)`` harmless (token 0 at position 0, a one-key context, and their
K/V written to a scratch block no sequence owns), runs bucket ``b`` and returns rows ``[0, n)``.

What runs a bucket is a callable built by ``make_step`` from the bucket's forward:
:class:`CudaGraphCapture` captures it into a ``torch.cuda.CUDAGraph`` and replays it;
:func:`eager_step` runs the same forward over the same static buffers without capture, which is
how the CPU tests check the bucketing, padding, copying, scratch writes and slicing. Capture and
replay themselves need CUDA and are not exercised by the CPU suite.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable

import torch

from llm_engine.attention import AttentionMetadata
from llm_engine.config import AttentionBackend
from llm_engine.model.llama import ForwardContext, LlamaForCausalLM

StepFn = Callable[[], torch.Tensor]


def capture_sizes(max_batch: int) -> list[int]:
    """``1, 2, 4, ...`` below ``max_batch``, then ``max_batch``: padding wastes under half a batch
    and a handful of graphs keeps capture time and graph memory small."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def eager_step(forward: StepFn) -> StepFn:
    """``make_step`` without capture: the bucket's forward runs as is on every call."""
    return forward


class CudaGraphCapture:
    """``make_step`` for CUDA: warms a bucket's forward up on a side stream (Triton compiles,
    cuBLAS picks workspaces), captures it, and returns a replay that yields the static output.
    All buckets share one memory pool; capture the largest first so the others fit in it."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, forward: StepFn) -> StepFn:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        return replay


class PaddedDecode:
    """Static decode buffers plus one step callable per captured batch size."""

    def __init__(self, model: LlamaForCausalLM, kv_layers: list[tuple[torch.Tensor, torch.Tensor]],
                 backend: AttentionBackend, block_size: int, scratch_block: int, max_batch: int, max_blocks: int,
                 make_step: Callable[[StepFn], StepFn]):
        self.model, self.kv_layers, self.backend, self.block_size = model, kv_layers, backend, block_size
        self.sizes = capture_sizes(max_batch)
        self.scratch_slot = scratch_block * block_size
        d = kv_layers[0][0].device
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=d)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=d)
        self.slot_mapping = torch.full((max_batch,), self.scratch_slot, dtype=torch.int64, device=d)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=d)
        self.block_tables = torch.full((max_batch, max_blocks), scratch_block, dtype=torch.int32, device=d)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=d)
        self.runs = dict.fromkeys(self.sizes, 0)  # steps run per bucket
        with torch.inference_mode():
            self.steps = {b: make_step(functools.partial(self._forward, b)) for b in reversed(self.sizes)}

    def _forward(self, b: int) -> torch.Tensor:
        # Fresh metadata per call: back ends cache per-step tensors in ``meta.derived``.
        meta = AttentionMetadata(self.slot_mapping[:b], self.query_start_loc[:b + 1], self.seq_lens[:b],
                                 self.block_tables[:b], max_query_len=1,
                                 max_seq_len=self.block_tables.shape[1] * self.block_size)
        return self.model(self.input_ids[:b], self.positions[:b], ForwardContext(meta, self.kv_layers, self.backend))

    def bucket(self, n: int) -> int:
        """The smallest captured batch size that holds ``n`` sequences."""
        return self.sizes[bisect.bisect_left(self.sizes, n)]

    def fits(self, meta: AttentionMetadata) -> bool:
        return (meta.is_decode_only and meta.seq_lens.numel() <= self.sizes[-1]
                and meta.block_tables.shape[1] <= self.block_tables.shape[1])

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states ``[n, hidden]`` of a decode step that :meth:`fits`; a view of the static
        output, valid until the next step."""
        n, w = input_ids.numel(), meta.block_tables.shape[1]
        b = self.bucket(n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        # Columns past ``w`` keep stale ids: a row reads only ceil(seq_len / block_size) entries.
        self.block_tables[:n, :w].copy_(meta.block_tables)
        self.input_ids[n:b] = 0
        self.positions[n:b] = 0
        self.slot_mapping[n:b] = self.scratch_slot
        self.seq_lens[n:b] = 1
        self.block_tables[n:b, 0] = self.scratch_slot // self.block_size
        self.runs[b] += 1
        return self.steps[b]()[:n]

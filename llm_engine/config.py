"""Typed configuration: the model's shape (read from a Hugging Face ``config.json``) and the engine's knobs."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class PreemptionMode(enum.StrEnum):
    """What happens to a preempted request's KV (see :mod:`llm_engine.scheduler`)."""

    RECOMPUTE = "recompute"  # freed; recomputed from prompt + output so far when it resumes
    SWAP = "swap"  # copied to the host swap area and back


class AttentionBackend(enum.StrEnum):
    """Paged-attention implementation; ``auto`` resolves to triton on CUDA, torch elsewhere."""

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


@dataclass
class ModelConfig:
    """Shape of a Llama-family decoder; ``from_pretrained`` reads it from ``config.json``."""

    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False  # Qwen2 sets q/k/v biases on
    tie_word_embeddings: bool = False
    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Accepts both the older ``rope_theta``/``rope_scaling`` keys and 5.x ``rope_parameters``."""
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or raw.get("rope_theta") or 10000.0
        kind = rope.get("rope_type", rope.get("type", "default"))
        eos = raw.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        mt = raw.get("model_type", "llama")
        return cls(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            head_dim=raw.get("head_dim"), rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 2048), rope_theta=float(theta),
            rope_scaling=None if kind == "default" else {**rope, "rope_type": kind},
            attention_bias=bool(raw.get("attention_bias", mt == "qwen2")),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            eos_token_id=eos, bos_token_id=raw.get("bos_token_id"), model_type=mt)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        p = Path(path) / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        return cls.from_dict(json.loads(p.read_text()))


@dataclass
class EngineConfig:
    """Engine knobs: KV pool size, batching limits, attention back end, preemption and decode graphs."""

    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    max_num_seqs: int = field(default=64, metadata={"help": "most sequences in one step"})
    max_num_batched_tokens: int = field(default=1024, metadata={"help": "token budget of one step"})
    max_model_len: int = field(default=0, metadata={"help": "longest prompt+output; 0 = model's max"})
    kv_cache_bytes: int = field(default=256 << 20, metadata={"help": "KV pool size on CPU, bytes"})
    gpu_memory_utilization: float = field(default=0.85, metadata={"help": "fraction of free GPU memory for the KV pool"})
    num_kv_blocks: int = field(default=0, metadata={"help": "force this many KV blocks (0 = from the budget)"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse cached KV blocks of shared prefixes"})
    enable_partial_block_reuse: bool = field(default=True, metadata={
        "help": "prefix caching also reuses the leading tokens of a cached block past the last full-block hit (copied)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    dtype: str = field(default="auto", metadata={"help": "float32, bfloat16, float16 or auto"})
    attention_backend: str = field(default="auto", metadata={"help": "torch, triton or auto (triton on CUDA)"})
    seed: int = field(default=0, metadata={"help": "seed for requests without their own"})
    speculative: bool = field(default=True, metadata={"help": "n-gram speculative decoding (adaptive: drafts only where they pay)"})
    spec_max_draft: int = field(default=8, metadata={"help": "most draft tokens per request per step"})
    preemption_mode: str = field(default="recompute", metadata={
        "help": "recompute, or swap: KV to host memory and back (recompute when the swap space is full)"})
    swap_space_bytes: int = field(default=256 << 20, metadata={"help": "host swap space of swap preemption, bytes"})
    num_swap_blocks: int = field(default=0, metadata={"help": "force this many host swap blocks (0 = from the bytes)"})
    cuda_graphs: bool = field(default=False, metadata={"help": "CUDA graphs for pure-decode steps (CUDA only)"})
    cuda_graph_max_batch: int = field(default=32, metadata={"help": "largest decode batch run through a CUDA graph"})

    def __post_init__(self) -> None:
        # Checked here, not at first use: a typo in a config file should fail at start-up.
        if self.preemption_mode not in tuple(PreemptionMode):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', not {self.preemption_mode!r}")
        self.preemption_mode = PreemptionMode(self.preemption_mode)  # a str still: flags and files give strings
        for name in ("swap_space_bytes", "num_swap_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.cuda_graph_max_batch < 1:
            raise ValueError(f"cuda_graph_max_batch must be >= 1, not {self.cuda_graph_max_batch}")

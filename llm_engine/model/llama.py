"""Llama-family decoder (Llama, Mistral-style GQA, Qwen2 with QKV bias) over a paged KV cache.

Input is a *flat* batch: ``T`` tokens of many sequences with their absolute positions and an
:class:`~llm_engine.attention.AttentionMetadata`; there is no padding. ``forward`` returns hidden
states; ``compute_logits`` is separate so callers project only the rows they need (the last token
of each sequence when sampling, chosen positions when scoring or verifying drafts).
Parameter names match Hugging Face so a checkpoint loads without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_engine.attention import AttentionMetadata, paged_attention, write_kv
from llm_engine.config import AttentionBackend, ModelConfig
from llm_engine.model.rope import RotaryEmbedding, rope_apply


@dataclass
class ForwardContext:
    """Per-step inputs shared by all layers: the paged caches and where this step's tokens go."""

    meta: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v), each [blocks, block_size, Hkv, D]
    backend: AttentionBackend = AttentionBackend.TORCH
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, signed sin) of this step, set once per forward


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (as the reference implementation does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention writing its K/V into the paged cache, then reading the context."""

    def __init__(self, cfg: ModelConfig, layer: int, rope: RotaryEmbedding):
        super().__init__()
        self.layer, self.rope = layer, rope
        self.h, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)
        self.scale = self.d ** -0.5
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        """One ``[(H + 2 Hkv) D, hidden]`` matrix instead of three: a small decode batch then runs
        one GEMM (and one RoPE over q and k together). ``q_proj``/``k_proj``/``v_proj`` stay, as
        views into it, so names, ``state_dict`` and memory are unchanged."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        w = torch.cat([p.weight.detach() for p in projs])
        self.qkv_weight = _share(projs, "weight", w)
        if self.q_proj.bias is not None:
            self.qkv_bias = _share(projs, "bias", torch.cat([p.bias.detach() for p in projs]))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t, h, hkv, d = x.shape[0], self.h, self.hkv, self.d
        if self.qkv_weight is not None and ctx.rope is not None:
            qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
            qk = rope_apply(qkv[:, :(h + hkv) * d].view(t, h + hkv, d), *ctx.rope)
            q, k = qk[:, :h], qk[:, h:]
            v = qkv[:, (h + hkv) * d:].view(t, hkv, d)
        else:
            q = self.q_proj(x).view(t, h, d)
            k = self.k_proj(x).view(t, hkv, d)
            v = self.v_proj(x).view(t, hkv, d)
            q, k = self.rope(positions, q, k)
        k_cache, v_cache = ctx.kv_caches[self.layer]
        write_kv(k_cache, v_cache, k, v, ctx.meta.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, ctx.meta, self.scale, ctx.backend)
        return self.o_proj(o.reshape(t, self.h * self.d))


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_weight: torch.Tensor | None = None

    def fuse(self) -> None:
        """Gate and up projections as one matrix (one GEMM per step); the originals become views."""
        projs = (self.gate_proj, self.up_proj)
        self.gate_up_weight = _share(projs, "weight", torch.cat([p.weight.detach() for p in projs]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP block with residuals."""

    def __init__(self, cfg: ModelConfig, layer: int, rope: RotaryEmbedding):
        super().__init__()
        self.self_attn = Attention(cfg, layer, rope)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, decoder stack and final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rope = rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rope) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        ctx.rope = self.rope.cos_sin(positions, x.dtype)  # once per step, shared by every layer
        for layer in self.layers:
            x = layer(x, positions, ctx)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head (tied to the embedding when the config says so)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def fuse_projections(self) -> "LlamaForCausalLM":
        """Fuse q/k/v and gate/up weights in every layer (see :meth:`Attention.fuse`). Call after
        the weights are loaded and moved to their device; returns ``self``."""
        with torch.no_grad():
            for layer in self.model.layers:
                layer.self_attn.fuse()
                layer.mlp.fuse()
        return self


def _share(modules: tuple[nn.Linear, ...], name: str, fused: torch.Tensor) -> torch.Tensor:
    """Re-point each module's ``name`` parameter at its rows of ``fused`` (no extra memory)."""
    at = 0
    for m in modules:
        n = getattr(m, name).shape[0]
        setattr(m, name, nn.Parameter(fused[at:at + n], requires_grad=False))
        at += n
    return fused

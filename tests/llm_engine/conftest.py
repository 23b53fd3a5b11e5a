"""Tiny random Llama / Qwen2 checkpoints written by ``transformers`` (the reference we must match)."""

from __future__ import annotations

import pytest
import torch


def make_hf_model(kind: str, path, *, vocab: int = 128, hidden: int = 64, layers: int = 2, heads: int = 4,
                  kv_heads: int = 2, rope_scaling: dict | None = None, seed: int = 0, max_pos: int = 512):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope.update(rope_scaling)
    if kind == "llama":
        cfg = tf.LlamaConfig(**common, rope_parameters=rope)
        model = tf.LlamaForCausalLM(cfg)
    else:
        cfg = tf.Qwen2Config(**common, rope_parameters=rope, use_sliding_window=False)
        model = tf.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # random biases so the QKV-bias path is exercised
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model = model.float().eval()
    model.save_pretrained(path, safe_serialization=True)
    write_word_tokenizer(path, vocab)
    return model


def write_word_tokenizer(path, vocab: int) -> None:
    """A word-level tokenizer ``w0 .. w{vocab-1}`` so string prompts and stop strings work."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    return path, make_hf_model("llama", path)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    return path, make_hf_model("qwen2", path, seed=1)


@pytest.fixture(scope="session")
def make_model():
    """Factory fixture: ``make_model(kind, path, **shape)`` writes a checkpoint and returns the HF model."""
    return make_hf_model

"""Random Llama-style model folders (config, safetensors, a real BPE tokenizer) for tests and
benchmarks: no weights can be downloaded here, and a random model is enough to measure speed or
to check that two execution paths compute the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "science fiction films: star wars, alien, blade runner, dune",
    "romantic films: the notebook, titanic, pride and prejudice",
    "a user who watched space operas and robots likes more science fiction",
    "def add(a, b): return a + b",
    "hello world, this is a tiny test corpus for a tiny tokenizer",
] * 20

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_random_llama(
    path: str | Path,
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab_size: int | None = None,
    max_positions: int = 1024,
    tokenizer_vocab: int = 384,
) -> Path:
    """Writes a random ``LlamaForCausalLM`` and a byte-level BPE tokenizer to ``path``.

    ``vocab_size`` defaults to the tokenizer's; a larger one (benchmarks) leaves the extra ids
    without text, which token-id inputs do not mind.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=tokenizer_vocab, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size or tok.get_vocab_size(), hidden_size=hidden,
                      intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=2,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path

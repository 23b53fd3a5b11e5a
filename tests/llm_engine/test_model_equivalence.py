"""Our model reproduces Hugging Face ``transformers`` exactly enough: logits and greedy text."""

from __future__ import annotations

import pytest
import torch

from llm_engine import EngineConfig, LLMEngine, SamplingParams
from llm_engine.config import ModelConfig
from llm_engine.model.loader import load_model


def engine_logits(path, prompt: list[int], backend: str = "torch") -> torch.Tensor:
    """Last-position logits from a single prefill through the paged cache."""
    eng = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=4, attention_backend=backend, device="cpu"))
    eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0))
    sched = eng.scheduler.schedule()
    hidden, inp = eng.runner.execute(sched)
    return eng.runner.logits(hidden, torch.arange(hidden.shape[0]))


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_qwen2"])
def test_logits_match_transformers(kind, request):
    path, hf = request.getfixturevalue(kind)
    prompt = [3, 17, 99, 5, 42, 8, 64, 1, 2, 77, 31]
    ours = engine_logits(path, prompt)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert torch.allclose(ours, ref, atol=1e-3), (ours - ref).abs().max()


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_qwen2"])
def test_greedy_generation_matches_transformers(kind, request):
    path, hf = request.getfixturevalue(kind)
    prompts = [[5, 6, 7, 8, 9], [100, 3, 44], list(range(10, 40))]
    eng = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=16, device="cpu"))
    for p in prompts:
        eng.add_request(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o.token_ids
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, len(p):]
        assert outs[str(i)] == ref.tolist()


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
])
def test_rope_scaling_variants_match_transformers(scaling, tmp_path, make_model):
    hf = make_model("llama", tmp_path, rope_scaling=scaling, seed=2)
    prompt = list(range(1, 90))
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert torch.allclose(engine_logits(tmp_path, prompt), ref, atol=1e-3)


def test_config_accepts_old_and_new_rope_keys():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    old = ModelConfig.from_dict({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    new = ModelConfig.from_dict({**base, "rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0}})
    assert old.rope_theta == new.rope_theta == 5e5
    assert old.rope_scaling["rope_type"] == new.rope_scaling["rope_type"] == "linear"


def test_sharded_checkpoint_loads(tiny_llama, tmp_path):
    path, hf = tiny_llama
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path)
    ref = load_model(path)
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n


def test_missing_weights_are_a_clear_error(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file
    path, _ = tiny_llama
    sd = load_file(str(next(path.glob("*.safetensors"))))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        load_model(tmp_path)


def test_prompt_logprobs_match_transformers_across_chunks(tiny_llama):
    from llm_engine import LLM

    path, hf = tiny_llama
    prompt = [(5 * i) % 120 + 1 for i in range(23)]
    llm = LLM(path, num_kv_blocks=32, block_size=4, max_num_batched_tokens=8)  # 3 prefill chunks
    out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0], -1)
    ours = [e[t] for e, t in zip(out.prompt_logprobs[1:], prompt[1:])]
    expect = ref[torch.arange(22), torch.tensor(prompt[1:])]
    assert out.prompt_logprobs[0] is None
    assert torch.allclose(torch.tensor(ours), expect, atol=1e-4)

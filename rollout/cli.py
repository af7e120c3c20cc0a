"""``rollout`` command line.

    rollout generate --model smollm2 --chat "What is the capital of France?"
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

logger = logging.getLogger("rollout")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="Hugging Face model directory, or 'smollm2' for the offline SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def _generate(args: argparse.Namespace) -> int:
    from engine import EngineConfig, LLMEngine, SamplingParams
    from engine.smollm2 import chat_prompt_ids

    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                    max_num_seqs=args.max_num_seqs, seed=args.seed))
    tok = engine.tokenizer
    texts = args.chat or args.prompt
    if not texts:
        raise SystemExit("give at least one --chat or --prompt")
    prompts = ([chat_prompt_ids(tok, [{"role": "user", "content": t}]) for t in args.chat] if args.chat
               else [tok.encode(t) for t in args.prompt])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.sample_seed)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    num_tokens = sum(len(c.token_ids) for c in outs)
    for text, out in zip(texts, outs):
        answer = tok.decode(out.token_ids, skip_special_tokens=True)
        print(f"> {text}\n{answer}\n[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]\n")
    print(f"{num_tokens} tokens in {elapsed:.2f} s: {num_tokens / elapsed:.1f} tokens/s "
          f"({engine.config.device}, {engine.config.dtype}, batch of {len(prompts)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rollout", description="RLHF rollout generation service")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate from prompts with one engine in this process")
    _add_engine_args(gen)
    gen.add_argument("--chat", action="append", help="a user message, wrapped in the model's chat template")
    gen.add_argument("--prompt", action="append", help="raw text, tokenized as is")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sample-seed", type=int, default=None)
    gen.set_defaults(func=_generate)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

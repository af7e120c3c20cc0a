"""The CPU path on the real SmolLM2-135M-Instruct (fp32): the batched CPU attention backend against the reference
loop, same engine, same prompts, greedy and sampled.

    python benchmarks/cpu_path.py [--prompts 64] [--max-tokens 96] [--backends reference,cpu] [--no-append]

Workload (the one issue 19 compared with vLLM's CPU build): 64 chat prompts through SmolLM2's chat template,
96 output tokens each (ignore_eos), greedy, then temperature 1 with n = 4 (seeded, so both backends draw the same
noise). Per backend: output tok/s after a short warm-up. Greedy tokens are compared across backends (the
reference loop is the oracle); sampled outputs are reported, not required to agree (float32 rounding can move
a draw).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.report import append_results, markdown_table  # noqa: E402

logger = logging.getLogger("cpu_path")


def chat_prompts(path: str, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    prompts = []
    for i in range(n):
        ids = tok.apply_chat_template([{"role": "user", "content": f"Question {i}: what is {i * 7} + {i * 3}, and "
                                        f"what is a good way to check the answer?"}],
                                      add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return prompts


def run(path: str, prompts: list[list[int]], max_tokens: int, seed: int | None, **config) -> dict:
    """One engine (``EngineConfig(model=path, max_num_seqs=256, **config)``): a short warm-up, then the greedy and
    the sampled (T = 1, n = 4, ``seed``) workloads; per workload seconds, every sample's tokens and tok/s."""
    from engine import EngineConfig, LLMEngine, SamplingParams
    engine = LLMEngine(EngineConfig(model=path, max_num_seqs=256, **config))
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))        # warm-up
    out = {}
    for name, params in (("greedy", SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)),
                         ("sampled", SamplingParams(max_tokens=max_tokens, temperature=1.0, n=4, seed=seed,
                                                    ignore_eos=True))):
        t0 = time.perf_counter()
        results = engine.generate(prompts, params)
        dt = time.perf_counter() - t0
        tokens = [list(c.token_ids) for c in results]               # one Completion per sample, prompt-major
        out[name] = {"s": dt, "tokens": tokens, "tok_s": sum(map(len, tokens)) / dt}
        logger.info("%s %s: %.1f tok/s in %.1f s", config, name, out[name]["tok_s"], dt)
    del engine
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--backends", default="reference,cpu")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.smollm2 import ensure_smollm2
    path = str(ensure_smollm2())
    prompts = chat_prompts(path, args.prompts)
    results = [{"backend": b, **run(path, prompts, args.max_tokens, 0, attention_backend=b)}
               for b in args.backends.split(",") if b]
    base = results[0]
    headers = ["attention backend", "greedy tok/s", "sampled (n=4) tok/s", f"greedy vs {base['backend']}",
               f"sampled vs {base['backend']}", f"greedy outputs = {base['backend']}'s",
               f"sampled outputs = {base['backend']}'s"]
    rows = []
    for r in results:
        same_g = sum(a == b for a, b in zip(r["greedy"]["tokens"], base["greedy"]["tokens"]))
        same_s = sum(a == b for a, b in zip(r["sampled"]["tokens"], base["sampled"]["tokens"]))
        rows.append([r["backend"], f"{r['greedy']['tok_s']:.1f}", f"{r['sampled']['tok_s']:.1f}",
                     f"{r['greedy']['tok_s'] / base['greedy']['tok_s']:.2f}x",
                     f"{r['sampled']['tok_s'] / base['sampled']['tok_s']:.2f}x",
                     f"{same_g} / {len(base['greedy']['tokens'])}", f"{same_s} / {len(base['sampled']['tokens'])}"])
    table = markdown_table(headers, rows)
    print(table)
    if not args.no_append:
        append_results("CPU path: batched CPU attention vs the reference loop (SmolLM2-135M-Instruct, fp32)", "cpu",
                       table, notes=f"`benchmarks/cpu_path.py`: {args.prompts} chat prompts, {args.max_tokens} output "
                                    f"tokens each (ignore_eos), greedy, then T = 1 with n = 4 (seeded); torch threads "
                                    f"{torch.get_num_threads()}; one engine per backend, a 4-token warm-up first.")
    return results


if __name__ == "__main__":
    main()

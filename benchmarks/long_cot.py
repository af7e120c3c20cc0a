"""Long chain-of-thought GRPO workload: G prompts x n samples, max_tokens 8192, actual lengths heavy-tailed
(most answers far shorter than max_tokens). Compares, in one run, on one KV pool:

  strict     the default: each sequence reserves context + max_tokens at admission; nothing running is moved
  swap       preemption="swap": reserve context + expected_output_tokens; when blocks run out the youngest
             running sequence's KV goes to the host pool and it resumes later (never recomputed)
  recompute  the vLLM-style baseline: reserve the context only; evict the newest running sequence and
             recompute it later

A sample's length is drawn from a log-normal (median 800 tokens, sigma 1, capped at max_tokens) and the
sample is ended when it reaches it, as a stop token would end it: the scheduler cannot see it coming.
Each sample is its own request (a GRPO group sent as n requests sharing the prompt's cached blocks).
Reports output tok/s, peak running sequences, swapped / preempted sequences, recomputed tokens and host
copies; prints a table and appends it to benchmarks/RESULTS.md.

    python benchmarks/long_cot.py                         # CPU, tiny random model, small sizes
    python benchmarks/long_cot.py --device cuda --shape qwen2.5-0.5b --dtype bfloat16
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.multi_turn import sync  # noqa: E402
from benchmarks.report import append_results, markdown_table  # noqa: E402
from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


def make_workload(num_prompts: int, n: int, vocab: int, seed: int, max_tokens: int, prompt_len=(100, 400),
                  median: float = 800.0, sigma: float = 1.0) -> list[tuple[list[int], int]]:
    """(prompt, target length) per sample; the n samples of a prompt are consecutive."""
    rng = random.Random(seed)
    work = []
    for _ in range(num_prompts):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_len))]
        for _ in range(n):
            length = int(min(max_tokens, max(1.0, rng.lognormvariate(math.log(median), sigma))))
            work.append((prompt, length))
    return work


def run_policy(name: str, config: EngineConfig, work, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    load_s = time.perf_counter() - t0
    engine.generate([[5] * 20] * 4, SamplingParams(max_tokens=8, ignore_eos=True))   # compile outside the timing
    base = engine.stats()
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0, seed=0)
    sync(engine)
    start = time.perf_counter()
    target = {}
    for i, (prompt, length) in enumerate(work):
        rid = engine.add_request(prompt, params, request_id=f"r{i}")
        target[rid] = length
    # When to look at a request next: it cannot produce more than one token a step.
    due: list[tuple[int, str]] = [(length, rid) for rid, length in target.items()]
    heapq.heapify(due)
    steps = 0
    generated = 0
    while engine.has_unfinished():
        for c in engine.step():
            generated += len(c.token_ids)
            target.pop(c.request_id, None)
        steps += 1
        while due and due[0][0] <= steps:
            _, rid = heapq.heappop(due)
            if rid not in target:
                continue
            made = engine.output_length(rid)
            if made >= target[rid]:
                for c in engine.abort(rid):          # its "stop token": ended now, KV freed
                    generated += len(c.token_ids)
                del target[rid]
            else:
                heapq.heappush(due, (steps + target[rid] - made, rid))
    sync(engine)
    elapsed = time.perf_counter() - start
    engine.check_integrity()
    s = engine.stats()
    d = {k: s[k] - base.get(k, 0) for k in ("prefill_tokens", "recomputed_tokens", "preemptions", "swapped_out",
                                            "host_copy_bytes", "steps", "steps_ahead")}
    result = dict(name=name, seconds=elapsed, load_s=load_s, generated=generated, tok_s=generated / elapsed,
                  peak_running=s["peak_running"], engine_steps=d["steps"], steps_ahead=d["steps_ahead"],
                  prefill=d["prefill_tokens"], recomputed=d["recomputed_tokens"], preemptions=d["preemptions"],
                  swapped=d["swapped_out"], host_copy_gb=d["host_copy_bytes"] / 1e9)
    del engine
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--shape", default=None, help="random weights of a real shape (engine.tiny_models.REAL_SHAPES)")
    p.add_argument("--prompts", type=int, default=None, help="default 64 on CUDA, 8 on CPU")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="default 8192 on CUDA, 512 on CPU")
    p.add_argument("--median", type=float, default=None, help="median sample length (default max_tokens / 10)")
    p.add_argument("--pool-tokens", type=int, default=None,
                   help="KV pool in tokens (default: a sixteenth of what every sample at max_tokens would need)")
    p.add_argument("--expected-output-tokens", type=int, default=None, help="swap mode (default 1.5 x median)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="strict,swap,recompute")
    p.add_argument("--json", default=None)
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    prompts = args.prompts or (64 if cuda else 8)
    max_tokens = args.max_tokens or (8192 if cuda else 512)
    median = args.median or max_tokens / 10
    expected = args.expected_output_tokens or int(1.5 * median)

    tmp = Path(tempfile.mkdtemp(prefix="long_cot-"))
    if args.shape:
        from engine.tiny_models import write_real_shape_config
        model, load_format, label = str(write_real_shape_config(args.shape, tmp / args.shape)), "dummy", \
            f"{args.shape} (random weights)"
    else:
        from engine.tiny_models import make_tiny_model
        model = str(make_tiny_model("qwen2", tmp / "tiny", seed=0, max_position_embeddings=max_tokens + 1024))
        load_format, label = "safetensors", "tiny random qwen2"
    from engine.kv_cache import kv_bytes_per_block
    from engine.model_config import ModelConfig
    import torch
    mc = ModelConfig.from_pretrained(model)
    work = make_workload(prompts, args.n, mc.vocab_size, args.seed, max_tokens, median=median)
    worst = sum(len(pr) + max_tokens for pr, _ in work)
    pool_tokens = args.pool_tokens or worst // 16
    num_blocks = pool_tokens // args.block_size
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    host_bytes = 2 * num_blocks * kv_bytes_per_block(mc, args.block_size, dtype)
    common = dict(model=model, device=args.device, dtype=args.dtype, load_format=load_format,
                  block_size=args.block_size, num_kv_blocks=num_blocks, max_num_seqs=len(work),
                  max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed,
                  max_model_len=max(len(pr) for pr, _ in work) + max_tokens + 1,
                  cuda_graph_max_batch=min(512, len(work)))
    policies = {
        "strict": ("strict reservation (default)", EngineConfig(**common, host_kv_cache_bytes=0)),
        "swap": (f"swap mode (expected {expected} tokens)",
                 EngineConfig(**common, preemption="swap", expected_output_tokens=expected,
                              host_kv_cache_bytes=host_bytes)),
        "recompute": ("recompute baseline (vLLM-style)",
                      EngineConfig(**common, preemption="recompute", host_kv_cache_bytes=0)),
    }
    results = []
    for key in args.only.split(","):
        name, cfg = policies[key]
        print(f"running {name} ...", flush=True)
        results.append(run_policy(name, cfg, work, max_tokens))
        r = results[-1]
        print(f"  {r['tok_s']:,.0f} tok/s in {r['seconds']:.2f} s, peak running {r['peak_running']}, "
              f"swapped {r['swapped']}, preempted {r['preemptions']}, recomputed {r['recomputed']}", flush=True)
    strict = results[0]
    headers = ["policy", "output tok/s", "vs strict", "wall s", "peak running", "engine steps", "swapped out",
               "preempted", "recomputed tokens", "prefill tokens", "host copies GB"]
    rows = [[r["name"], r["tok_s"], f"{r['tok_s'] / strict['tok_s']:.2f}x", r["seconds"], r["peak_running"],
             r["engine_steps"], r["swapped"], r["preemptions"], r["recomputed"], r["prefill"],
             round(r["host_copy_gb"], 2)] for r in results]
    table = markdown_table(headers, rows)
    lengths = sorted(length for _, length in work)
    notes = (f"Workload: {prompts} prompts x n={args.n} (each sample its own request), prompts 100-400 tokens, "
             f"max_tokens {max_tokens}, sample lengths log-normal (median {median:.0f}, sigma 1, capped): median "
             f"{lengths[len(lengths) // 2]}, p90 {lengths[int(0.9 * len(lengths))]}, max {lengths[-1]}, "
             f"{sum(lengths):,} tokens in all; each sample ended at its length (unforeseeable to the scheduler). "
             f"Model {label}, {args.dtype}; KV pool {num_blocks} blocks of {args.block_size} = {pool_tokens:,} tokens "
             f"(a sixteenth of every sample at max_tokens); swap host pool twice the device pool; temperature 1, seeded.")
    print(table)
    print(notes)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.no_results:
        append_results("long_cot: GRPO with long, heavy-tailed answers", args.device, table, notes)


if __name__ == "__main__":
    main()

"""Agentic multi-turn workload: sessions of several turns with simulated tool latency between them,
a KV pool far smaller than all sessions need. Compares, in one run:

  ours          preemption-free reservation admission, session KV retained (offloaded to a host pool
                under pressure), prefix cache on
  recompute     vLLM-style baseline: admit without reserving, preempt the newest running sequence and
                recompute it later; no session retention (prefix cache on, as vLLM)
  no-retention  every turn re-prefills the whole history (no retention, no prefix cache)

Reports prefill tokens computed, recomputed tokens, preemptions, offload/drop counts and output
throughput, checks that greedy outputs agree across policies, prints a table and appends it to
benchmarks/RESULTS.md.

    python benchmarks/multi_turn.py                       # CPU, tiny random model
    python benchmarks/multi_turn.py --device cuda --shape qwen2.5-0.5b --dtype bfloat16
"""
from __future__ import annotations

import argparse
import heapq
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import append_results, markdown_table  # noqa: E402
from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


@dataclass
class SessionPlan:
    turns: list[tuple[list[int], int]]   # (new tokens, max_tokens) per turn
    latencies: list[float]               # tool latency after each turn


def make_workload(num_sessions: int, num_turns: int, vocab: int, seed: int,
                  obs=(50, 300), out=(20, 200), latency_ms=(0, 50)) -> list[SessionPlan]:
    rng = random.Random(seed)
    plans = []
    for _ in range(num_sessions):
        turns = [([rng.randrange(3, vocab) for _ in range(rng.randint(*obs))], rng.randint(*out))
                 for _ in range(num_turns)]
        plans.append(SessionPlan(turns, [rng.uniform(*latency_ms) / 1000 for _ in range(num_turns)]))
    return plans


def kv_tokens_needed(plans: list[SessionPlan]) -> int:
    return sum(sum(len(t) + m for t, m in p.turns) for p in plans)


def run_policy(name: str, config: EngineConfig, plans: list[SessionPlan]) -> dict:
    engine = LLMEngine(config)
    outputs: dict[tuple[int, int], list[int]] = {}
    sids = [engine.open_session(f"s{i}", ttl_s=3600.0) for i in range(len(plans))]
    next_turn = [0] * len(plans)
    ready: list[tuple[float, int]] = [(0.0, i) for i in range(len(plans))]
    in_flight: dict[str, int] = {}
    start = time.perf_counter()
    generated = 0
    while ready or in_flight:
        now = time.perf_counter() - start
        while ready and ready[0][0] <= now:
            _, i = heapq.heappop(ready)
            tokens, max_tokens = plans[i].turns[next_turn[i]]
            rid = engine.submit_turn(sids[i], tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            in_flight[rid] = i
        if not engine.has_unfinished():
            if ready:
                time.sleep(max(0.0, ready[0][0] - (time.perf_counter() - start)))
            continue
        for c in engine.step():
            i = in_flight.pop(c.request_id)
            outputs[(i, next_turn[i])] = c.token_ids
            generated += len(c.token_ids)
            next_turn[i] += 1
            if next_turn[i] < len(plans[i].turns):
                heapq.heappush(ready, (time.perf_counter() - start + plans[i].latencies[next_turn[i] - 1], i))
            else:
                engine.close_session(sids[i])
    elapsed = time.perf_counter() - start
    engine.check_integrity()
    s = engine.stats()
    return dict(name=name, seconds=elapsed, generated=generated, tok_s=generated / elapsed,
                prefill=s["prefill_tokens"], recomputed=s["recomputed_tokens"], preemptions=s["preemptions"],
                offloaded=s["offloaded_sessions"], restored=s["restored_sessions"], dropped=s["dropped_sessions"],
                cached=s["cached_prompt_tokens"], outputs=outputs, blocks=s["num_total_blocks"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--model", default=None, help="model directory (default: a tiny random qwen2)")
    p.add_argument("--shape", default=None, help="random weights of a real shape (engine.tiny_models.REAL_SHAPES)")
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--pool-fraction", type=float, default=0.4, help="KV pool / KV all sessions need")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="multi_turn-"))
    load_format = "safetensors"
    if args.shape:
        from engine.tiny_models import write_real_shape_config
        model = str(write_real_shape_config(args.shape, tmp / args.shape))
        load_format = "dummy"
        label = f"{args.shape} (random weights)"
    elif args.model:
        model, label = args.model, Path(args.model).name
    else:
        from engine.tiny_models import make_tiny_model
        model = str(make_tiny_model("qwen2", tmp / "tiny", seed=0, max_position_embeddings=4096))
        label = "tiny random qwen2"
    from engine.model_config import ModelConfig
    vocab = ModelConfig.from_pretrained(model).vocab_size

    plans = make_workload(args.sessions, args.turns, vocab, args.seed)
    need_tokens = kv_tokens_needed(plans)
    need_blocks = -(-need_tokens // args.block_size) + len(plans)
    num_blocks = int(need_blocks * args.pool_fraction)
    common = dict(model=model, device=args.device, dtype=args.dtype, load_format=load_format,
                  block_size=args.block_size, num_kv_blocks=num_blocks, max_num_seqs=256,
                  max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed)
    probe = LLMEngine(EngineConfig(**common))
    host_bytes = need_blocks * probe.kv_block_bytes
    del probe
    policies = [
        ("ours (no preemption, sessions retained)", EngineConfig(**common, host_kv_cache_bytes=host_bytes)),
        ("recompute baseline (vLLM-style)", EngineConfig(**common, preemption="recompute", retain_sessions=False)),
        ("no-retention baseline", EngineConfig(**common, retain_sessions=False, enable_prefix_caching=False)),
    ]
    results = []
    for name, cfg in policies:
        print(f"running {name} ...", flush=True)
        results.append(run_policy(name, cfg, plans))
    ours = results[0]
    headers = ["policy", "prefill tokens", "recomputed tokens", "preemptions", "offloaded / restored / dropped sessions",
               "output tok/s", "wall s", "outputs = ours"]
    rows = [[r["name"], r["prefill"], r["recomputed"], r["preemptions"],
             f"{r['offloaded']} / {r['restored']} / {r['dropped']}", r["tok_s"], r["seconds"],
             "yes" if r["outputs"] == ours["outputs"] else "NO"] for r in results]
    table = markdown_table(headers, rows)
    ratio = results[2]["prefill"] / max(1, ours["prefill"])
    notes = (f"Workload: {args.sessions} sessions x {args.turns} turns, observations 50-300 tokens, outputs 20-200 "
             f"tokens (ignore_eos), tool latency 0-50 ms; model {label}, {args.dtype}; KV pool {num_blocks} blocks of "
             f"{args.block_size} = {args.pool_fraction:.0%} of the {need_blocks} blocks all sessions need; host pool "
             f"(ours) sized for all of them. No-retention computes {ratio:.1f}x the prefill tokens of ours.")
    print(table)
    print(notes)
    if not args.no_results:
        append_results("multi_turn: agentic sessions under KV pressure", args.device, table, notes)


if __name__ == "__main__":
    main()

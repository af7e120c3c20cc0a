"""Do host offload / restore copies slow the engine down? Engine step time of a pure decode batch with no KV
moving, against the same batch while every step also offloads and restores sessions' worth of blocks
(device -> host and host -> device, pinned, on the side copy stream), in one run on one card.

The moving blocks are ones no running sequence holds (taken from the top of a pool sized well above what
the batch grows into), so the decode itself is unchanged; the copies ride on the real path
(``ModelRunner.launch``: gather on the main stream, copies and scatter on the copy stream). Also reports
the same copies done synchronously, alone: what a blocking copy would add to a step.

    python benchmarks/offload_overlap.py --device cuda --shape llama-3.1-8b --dtype bfloat16
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.multi_turn import sync  # noqa: E402
from benchmarks.report import append_results, markdown_table  # noqa: E402
from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


def step_times(engine: LLMEngine, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shape", default="qwen2.5-0.5b")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--session-tokens", type=int, default=1024, help="tokens of one moving session")
    p.add_argument("--rates", default="0.25,1", help="sessions moved each way per step")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--json", default=None)
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args()

    from engine.tiny_models import write_real_shape_config
    model = str(write_real_shape_config(args.shape, Path(tempfile.mkdtemp(prefix="overlap-")) / args.shape))
    bs = args.block_size
    rates = [float(r) for r in args.rates.split(",")]
    per_session = -(-args.session_tokens // bs)
    moving = int(per_session * max(rates)) * 2 + 2            # out and in regions, at the largest rate
    reps = 3                                                  # measurement rounds (no movement, each rate)
    grow = args.batch * (-(-(args.context + (len(rates) + 1) * reps * args.steps + 64) // bs))
    num_blocks = grow + moving + 8
    engine = LLMEngine(EngineConfig(model=model, device=args.device, dtype=args.dtype, load_format="dummy",
                                    block_size=bs, num_kv_blocks=num_blocks, max_num_seqs=args.batch,
                                    max_num_batched_tokens=8192, host_kv_cache_bytes=0))
    from engine.kv_offload import HostKVCache
    host = HostKVCache(engine.kv_caches, moving)
    engine.runner.host_cache = host
    engine.host_cache = host
    prompts = [[3 + (i * 7 + j) % 1000 for j in range(args.context)] for i in range(args.batch)]
    max_tokens = (len(rates) + 1) * reps * args.steps + 16
    for pr in prompts:
        engine.add_request(pr, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    while any(s.num_computed_tokens < args.context for s in engine.scheduler.running.values()) \
            or engine.scheduler.waiting:
        engine.step()                                          # prefill, then decode steps only
    step_times(engine, 20)                                     # warm

    top = list(range(num_blocks - moving, num_blocks))        # never allocated: the pool fills from the bottom
    half = moving // 2
    launch = engine.runner.launch
    state = {"n": 0, "flip": 0}

    def moving_launch(output, rows, prev=None):
        n = state["n"]
        if n and output.scheduled:
            # device top[:half] <-> host 0..half: out of one region, into the other (alternating)
            src, dst = (top[:n], top[half:half + n]) if state["flip"] else (top[half:half + n], top[:n])
            state["flip"] ^= 1
            output = dataclasses.replace(output, swap_out=list(zip(src, range(n))),
                                         swap_in=list(zip(range(half, half + n), dst)))
        return launch(output, rows, prev)
    engine.runner.launch = moving_launch

    rounds: dict = {0.0: []}
    for r in rates:
        rounds[r] = []
    for _ in range(reps):                                      # interleaved, so drift hits every rate alike
        for r in [0.0] + rates:
            state["n"] = int(per_session * r)
            sync(engine)
            rounds[r].append(statistics.median(step_times(engine, args.steps)))
    state["n"] = 0
    del engine.runner.launch
    held = [b for b in top if engine.scheduler.pool.ref_count(b)]
    assert not held, f"benchmark blocks were allocated to sequences: {held[:5]}"

    # the same copies, synchronously and alone (what a blocking copy would add to a step)
    import torch
    block_bytes = host.block_bytes
    sync_ms = {}
    for r in rates:
        n = int(per_session * r)
        times = []
        for _ in range(5):
            sync(engine)
            t0 = time.perf_counter()
            host.copy(host.gather(list(zip(top[:n], range(n)))), list(zip(range(half, half + n), top[half:half + n])), [])
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        sync_ms[r] = statistics.median(times) * 1e3
    base = statistics.median(rounds[0.0]) * 1e3
    rows = [["none", 0, 0.0, round(base, 3), "1.00x", "-", "-"]]
    for r in rates:
        n = int(per_session * r)
        ms = statistics.median(rounds[r]) * 1e3
        gb = 2 * n * block_bytes / 1e9
        rows.append([f"{r:g} session each way", n, round(gb, 3), round(ms, 3), f"{ms / base:.2f}x",
                     round(sync_ms[r], 3), f"{(base + sync_ms[r]) / base:.2f}x"])
    table = markdown_table(["KV moved per step", "blocks each way", "GB per step", "engine step ms",
                            "vs no movement", "same copies alone, blocking ms", "a blocking step would be"], rows)
    notes = (f"{args.shape} (random weights), {args.dtype}; decode batch {args.batch} at context {args.context}+ "
             f"(CUDA graphs, decode steps planned ahead); a session = {args.session_tokens} tokens = {per_session} "
             f"blocks of {bs} ({per_session * block_bytes / 1e6:.1f} MB); {args.steps} steps a round, {reps} rounds "
             f"per rate interleaved, median of round medians. Engine step = wall time of LLMEngine.step in the "
             f"steady state. Copies: gather on the main stream, host copies and scatter on the side stream.")
    print(table)
    print(notes)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "rounds": {str(k): v for k, v in rounds.items()}}))
    if not args.no_results:
        append_results("offload_overlap: engine step time while KV moves to and from the host", args.device,
                       table, notes)


if __name__ == "__main__":
    main()

"""Agentic multi-turn workload: sessions of several turns with simulated tool latency between them,
a KV pool far smaller than all sessions need. Compares, in one run:

  ours          preemption-free reservation admission that counts what idle sessions can give back, session
                KV retained (offloaded to a pinned host pool under pressure, copies on a side stream),
                prefix cache on
  recompute     vLLM-style baseline: admit without reserving, preempt the newest running sequence and
                recompute it later; no session retention (prefix cache on, as vLLM)
  no-retention  every turn re-prefills the whole history (no retention, no prefix cache)

Reports prefill tokens computed, recomputed tokens, preemptions, offload/drop counts, output throughput and
the time split that explains it (host time in schedule / launch / update, waiting for the device, waiting
for restores, idle waiting for tools; graph and eager steps, steps planned ahead, batch sizes, bytes
copied to and from the host), checks that greedy outputs agree across policies, prints a table and
appends it to benchmarks/RESULTS.md.

    python benchmarks/multi_turn.py                       # CPU, tiny random model
    python benchmarks/multi_turn.py --device cuda --shape qwen2.5-0.5b --dtype bfloat16
"""
from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import append_results, markdown_table  # noqa: E402
from benchmarks.timing import timed_methods  # noqa: E402
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


def sync(engine: LLMEngine) -> None:
    if engine.device.type == "cuda":
        import torch
        torch.cuda.synchronize(engine.device)


def warm_up(engine: LLMEngine, vocab: int) -> None:
    """Compile the kernels a run uses (prefill chunks, decode graphs, host copies) outside the timed region."""
    sid = engine.open_session("warm-up", ttl_s=3600.0)
    engine.run_turn(sid, [3 + i % (vocab - 3) for i in range(40)], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.close_session(sid)
    engine.generate([[5] * 20] * 4, SamplingParams(max_tokens=8, ignore_eos=True))
    sync(engine)


def run_policy(name: str, config: EngineConfig, plans: list[SessionPlan], vocab: int,
               profile_window: tuple[int, int] | None = None, cprofile_top: int = 0) -> dict:
    """One policy over the session plans. ``cprofile_top``: profile the timed loop with cProfile and print the
    functions with the most own time (host-side Python, every thread's work done on this one)."""
    t_load = time.perf_counter()
    engine = LLMEngine(config)
    load_s = time.perf_counter() - t_load
    warm_up(engine, vocab)
    timeline = None
    if engine.device.type == "cuda":
        from benchmarks.step_timeline import StepTimeline
        timeline = StepTimeline(engine.runner, profile_window)
        timeline.install()
    base = engine.stats()
    steps_before = dict(engine.runner.step_counts)
    outputs: dict[tuple[int, int], list[int]] = {}
    sids = [engine.open_session(f"s{i}", ttl_s=3600.0) for i in range(len(plans))]
    next_turn = [0] * len(plans)
    ready: list[tuple[float, int]] = [(0.0, i) for i in range(len(plans))]
    in_flight: dict[str, int] = {}
    batch_sizes: list[int] = []
    launch = engine.runner.launch

    def counted_launch(output, rows, prev=None):
        if output.scheduled:
            batch_sizes.append(len(output.scheduled))
        return launch(output, rows, prev)
    engine.runner.launch = counted_launch
    acc: dict = {}
    targets = [(engine.scheduler, "schedule", "schedule"),
               (engine.scheduler, "schedule_decode_ahead", "plan decode ahead"),
               (engine.runner, "launch", "launch (inputs, kernels, copies)"),
               (engine.outputs, "record", "wait for the device + read rows"),
               (engine.scheduler, "update", "update"),
               (engine.host_cache, "wait", "wait for restores (nothing else to run)")]
    idle = 0.0
    generated = 0
    profiler = None
    if cprofile_top:
        import cProfile
        profiler = cProfile.Profile()
    with timed_methods(targets, acc):
        sync(engine)
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        while ready or in_flight:
            now = time.perf_counter() - start
            while ready and ready[0][0] <= now:
                _, i = heapq.heappop(ready)
                tokens, max_tokens = plans[i].turns[next_turn[i]]
                rid = engine.submit_turn(sids[i], tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
                in_flight[rid] = i
            if not engine.has_unfinished():
                if ready:
                    t0 = time.perf_counter()
                    time.sleep(max(0.0, ready[0][0] - (t0 - start)))
                    idle += time.perf_counter() - t0
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
        sync(engine)
        elapsed = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
            _print_profile(name, profiler, cprofile_top)
    engine.check_integrity()
    device_steps = {}
    if timeline is not None:
        device_steps = timeline.summary()
        timeline.uninstall()
        if timeline.profile_summary:
            print(f"[{name}] {timeline.profile_summary}", flush=True)
    s = engine.stats()
    d = {k: s[k] - base.get(k, 0) for k in ("prefill_tokens", "recomputed_tokens", "preemptions",
                                            "offloaded_sessions", "restored_sessions", "dropped_sessions",
                                            "cached_prompt_tokens", "steps", "steps_ahead", "host_copy_bytes",
                                            "offloaded_bytes", "restored_bytes")}
    split = {k: round(v, 3) for k, v in acc.items()}
    split["idle (waiting for tools)"] = round(idle, 3)
    split["other (benchmark loop, stats)"] = round(elapsed - sum(acc.values()) - idle, 3)
    runner_steps = {k: v - steps_before.get(k, 0) for k, v in engine.runner.step_counts.items()}
    result = dict(name=name, seconds=elapsed, generated=generated, tok_s=generated / elapsed, load_s=load_s,
                  prefill=d["prefill_tokens"], recomputed=d["recomputed_tokens"], preemptions=d["preemptions"],
                  offloaded=d["offloaded_sessions"], restored=d["restored_sessions"], dropped=d["dropped_sessions"],
                  cached=d["cached_prompt_tokens"], steps=len(batch_sizes), steps_ahead=d["steps_ahead"],
                  runner_steps=runner_steps, mean_batch=sum(batch_sizes) / max(1, len(batch_sizes)),
                  peak_running=s["peak_running"], host_copy_gb=d["host_copy_bytes"] / 1e9,
                  time_split_s=split, device_steps=device_steps, outputs=outputs, blocks=s["num_total_blocks"])
    del engine
    return result


def _print_profile(name: str, profiler, top: int) -> None:
    import io
    import pstats
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(top)
    print(f"[{name}] cProfile of the timed loop, by own time (the profiler slows Python calls: compare "
          f"policies, not wall times)\n{buf.getvalue()}", flush=True)


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
    p.add_argument("--only", default="ours,recompute,no-retention", help="comma-separated policies to run")
    p.add_argument("--profile-window", default=None, metavar="FIRST:COUNT",
                   help="CUDA: torch.profiler over engine steps FIRST..FIRST+COUNT of each policy (top kernels)")
    p.add_argument("--cprofile", type=int, default=0, metavar="N",
                   help="profile each policy's timed loop with cProfile and print its top N functions by own time")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
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
    from engine.kv_cache import kv_bytes_per_block
    from engine.model_config import ModelConfig
    mc = ModelConfig.from_pretrained(model)
    vocab = mc.vocab_size

    plans = make_workload(args.sessions, args.turns, vocab, args.seed)
    need_tokens = kv_tokens_needed(plans)
    need_blocks = -(-need_tokens // args.block_size) + len(plans)
    num_blocks = int(need_blocks * args.pool_fraction)
    import torch
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    host_bytes = need_blocks * kv_bytes_per_block(mc, args.block_size, dtype)
    common = dict(model=model, device=args.device, dtype=args.dtype, load_format=load_format,
                  block_size=args.block_size, num_kv_blocks=num_blocks, max_num_seqs=256,
                  max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed)
    policies = {
        "ours": ("ours (no preemption, sessions retained)", EngineConfig(**common, host_kv_cache_bytes=host_bytes)),
        "ours-eager-mixed": ("ours, steps with prefill chunks run eagerly (no mixed-step graphs)",
                             EngineConfig(**common, host_kv_cache_bytes=host_bytes, cuda_graph_max_tokens=0)),
        "ours-ahead-after-decode-only": ("ours, steps planned ahead after decode steps only",
                                         EngineConfig(**common, host_kv_cache_bytes=host_bytes,
                                                      async_after_prefill=False)),
        "recompute": ("recompute baseline (vLLM-style)",
                      EngineConfig(**common, preemption="recompute", retain_sessions=False, host_kv_cache_bytes=0)),
        "recompute-ahead-after-decode-only": ("recompute baseline, steps planned ahead after decode steps only "
                                              "(vLLM-style)",
                                              EngineConfig(**common, preemption="recompute", retain_sessions=False,
                                                           host_kv_cache_bytes=0, async_after_prefill=False)),
        "no-retention": ("no-retention baseline", EngineConfig(**common, retain_sessions=False,
                                                               enable_prefix_caching=False, host_kv_cache_bytes=0)),
    }
    # admissions and landed restores left to a full schedule (EngineConfig.async_admissions off; on by default),
    # ours and the baseline
    for key in ("ours", "recompute"):
        label_, cfg_ = policies[key]
        policies[f"{key}-admissions-not-ahead"] = (label_.replace(" (", ", admissions not planned ahead (", 1),
                                                   dataclasses.replace(cfg_, async_admissions=False))
    # the same engines with the extend kernel's split-KV on (EngineConfig.extend_kv_splits, off by default)
    for key in ("ours", "recompute"):
        label_, cfg_ = policies[key]
        policies[f"{key}-extend-split"] = (label_.replace(" (", ", extend attention split 4 ways (", 1),
                                           dataclasses.replace(cfg_, extend_kv_splits=4))
    results = []
    for key in args.only.split(","):
        name, cfg = policies[key]
        print(f"running {name} ...", flush=True)
        window = tuple(int(x) for x in args.profile_window.split(":")) if args.profile_window else None
        results.append(run_policy(name, cfg, plans, vocab, window, args.cprofile))
        r = results[-1]
        print(f"  {r['tok_s']:,.0f} tok/s in {r['seconds']:.2f} s (engine load {r['load_s']:.1f} s); "
              f"split {r['time_split_s']}", flush=True)
    ours = results[0]
    baselines = [r for r in results if "baseline" in r["name"]]
    best = max(baselines, key=lambda r: r["tok_s"], default=None)
    headers = ["policy", "prefill tokens", "recomputed tokens", "preemptions", "offloaded / restored / dropped sessions",
               "output tok/s", "wall s", "vs best baseline", "steps (decode graph / mixed graph / eager / ahead)", "mean batch",
               "peak running", "host copies GB", "outputs = ours"]
    rows = [[r["name"], r["prefill"], r["recomputed"], r["preemptions"],
             f"{r['offloaded']} / {r['restored']} / {r['dropped']}", r["tok_s"], r["seconds"],
             f"{r['tok_s'] / best['tok_s']:.2f}x" if best else "-",
             f"{r['runner_steps'].get('graph', 0)} / {r['runner_steps'].get('mixed graph', 0)} / "
             f"{r['runner_steps'].get('eager', 0)} / {r['steps_ahead']}",
             round(r["mean_batch"], 1), r["peak_running"], round(r["host_copy_gb"], 2),
             "yes" if r["outputs"] == ours["outputs"] else "NO"] for r in results]
    table = markdown_table(headers, rows)
    split_keys = list(dict.fromkeys(k for r in results for k in r["time_split_s"]))
    split_table = markdown_table(["host time, s"] + [r["name"].split(" (")[0] for r in results],
                                 [[k] + [r["time_split_s"].get(k, 0.0) for r in results] for k in split_keys])
    no_ret = next((r for r in results if r["name"].startswith("no-retention")), None)
    ratio = no_ret["prefill"] / max(1, ours["prefill"]) if no_ret else float("nan")
    notes = (f"Workload: {args.sessions} sessions x {args.turns} turns, observations 50-300 tokens, outputs 20-200 "
             f"tokens (ignore_eos), tool latency 0-50 ms; model {label}, {args.dtype}; KV pool {num_blocks} blocks of "
             f"{args.block_size} = {args.pool_fraction:.0%} of the {need_blocks} blocks all sessions need; host pool "
             f"(ours) sized for all of them; token budget {args.max_num_batched_tokens}. No-retention computes "
             f"{ratio:.1f}x the prefill tokens of ours. Each engine compiled its kernels on a warm-up session first "
             f"(outside the timed region).\n\nTime split (host wall time by where the engine thread was):\n\n"
             f"{split_table}")
    if any(r["device_steps"] for r in results):
        kinds = list(dict.fromkeys(k for r in results for k in r["device_steps"]))
        dev_rows = []
        for r in results:
            for k in kinds:
                g = r["device_steps"].get(k)
                if g:
                    dev_rows.append([r["name"].split(" (")[0], k, g["steps"], round(g["mean_rows"], 1),
                                     round(g["mean_tokens"], 1), round(g["host_ms"], 2), round(g["busy_ms"], 2),
                                     round(g["busy_s"], 2), round(g["gap_s"], 2)])
        notes += ("\n\nDevice time by step kind (CUDA events around each launch on the main stream; busy = a "
                  "step's first to last queued work, gap = the device idle before the step, waiting for the host):"
                  "\n\n" + markdown_table(["policy", "step kind", "steps", "mean rows", "mean tokens",
                                             "host launch ms", "device ms / step", "device s", "device gap s"],
                                            dev_rows))
    print(table)
    print(notes)
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "outputs"} for r in results],
                                              indent=1))
    if not args.no_results:
        append_results("multi_turn: agentic sessions under KV pressure", args.device, table, notes)


if __name__ == "__main__":
    main()

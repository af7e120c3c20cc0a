"""A mixture-of-experts model on the GPU (issue 21): the fused MoE path against the torch block, decode steps against
the floor of the bytes they must read, and a W1-style workload, on the Qwen3-30B-A3B shape (random bf16 weights).

    python benchmarks/moe_gpu.py [--shape qwen3-30b-a3b] [--requests 256] [--output 512] [--no-append]
    python benchmarks/moe_gpu.py --tiny            # CPU smoke run of every part (tiny MoE model, few tokens)

check   one MoE layer of the engine's model, fused path vs torch block, on random hidden states of 1 and 256 rows:
        max |difference| (they sum in different orders: close, not equal)
decode  one engine step of B 1-token decodes at context ~512 (benchmarks.engine_timing.decode_step_times), B = 1, 256;
        floor = (bytes of the weights a step reads + KV bytes) / copy bandwidth, where a step reads the attention,
        norms, routers and lm_head whole and of each MoE layer only the experts its B tokens chose (expected
        count: E * (1 - (1 - k/E)^B), a uniform router)
w       256 requests, prompts 100-1024 tokens, 512 greedy output tokens: output tok/s (the engine's time split)
vLLM side by side: benchmarks/peer_gpu.py --only moe.
--profile adds one MoE layer alone at 1-8192 tokens (device time from CUDA graphs) and a torch.profiler table of
decode steps; --sweep times the grouped products' tilings (moe_gpu.SWEEP) at 1-8192 tokens.
Prints a table and appends it to benchmarks/RESULTS.md (GPU runs; --no-append skips).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import append_results, markdown_table  # noqa: E402
from benchmarks.engine_timing import copy_bandwidth, decode_step_times, log, run_ours, w1_prompts  # noqa: E402
from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


def step_weight_bytes(eng: LLMEngine, batch: int) -> float:
    """Expected weight bytes one decode step of ``batch`` tokens reads (see the module docstring)."""
    mc = eng.model_config
    total = 0.0
    for name, p in eng.model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name == "embed_tokens.weight" and eng.model.lm_head.weight is not p:
            continue   # an untied table is only gathered
        if name.endswith("moe.gate_up") or name.endswith("moe.down"):
            e, k = mc.num_experts, mc.num_experts_per_tok
            nbytes *= (1 - (1 - k / e) ** batch)       # the share of experts the batch touches
        total += nbytes
    return total


def check_layer(eng: LLMEngine, device: str) -> dict:
    moe = next(layer.moe for layer in eng.model.layers if layer.moe is not None)
    out = {}
    for rows in (1, 256):
        x = torch.randn(rows, eng.model_config.hidden_size, device=device, dtype=eng.dtype) * 0.5
        was = moe.use_fused
        moe.use_fused = False
        want = moe(x)
        moe.use_fused = True
        got = moe(x)
        fused_ran = moe.use_fused is True
        moe.use_fused = was
        out[f"max_abs_diff_{rows}"] = (got.float() - want.float()).abs().max().item()
        out[f"fused_ran_{rows}"] = fused_ran
    return out


def _graph_ms(fn) -> float:
    """Device ms of one ``fn()`` replayed from a CUDA graph (no host launch cost)."""
    from benchmarks.kernels_gpu import graph_us_per_call
    return graph_us_per_call(lambda i: fn(), copies=1) / 1e3


def _layer_inputs(eng: LLMEngine, tokens: int):
    from engine.kernels.moe import fused_route
    from engine.models.decoder import fused_kernels

    moe = next(layer.moe for layer in eng.model.layers if layer.moe is not None)
    mc = eng.model_config
    x = torch.randn(tokens, mc.hidden_size, device="cuda", dtype=eng.dtype) * 0.5
    weights, ids = fused_route(torch.nn.functional.linear(x, moe.router.weight), mc.num_experts_per_tok,
                               mc.norm_topk_prob)
    expert_bytes = (moe.gate_up[0].numel() + moe.down[0].numel()) * moe.gate_up.element_size()
    return moe, x, weights, ids, fused_kernels().silu_and_mul, expert_bytes


def profile_layer(eng: LLMEngine, copy_gbs: float, token_counts=(1, 64, 256, 2048, 8192)) -> list:
    """One MoE layer's experts (the fused path after routing) alone at T tokens: device ms from a CUDA graph, and the
    floor of the expert bytes its T tokens touch."""
    from engine.kernels.moe import block_m_for, fused_moe

    mc = eng.model_config
    rows = []
    for t in token_counts:
        moe, x, weights, ids, silu, expert_bytes = _layer_inputs(eng, t)
        ms = _graph_ms(lambda: fused_moe(x, moe.gate_up, moe.down, weights, ids, silu))
        active = len(set(ids.flatten().tolist()))
        rows.append({"tokens": t, "block_m": block_m_for(t * mc.num_experts_per_tok, mc.num_experts),
                     "device_ms": ms, "active_experts": active,
                     "floor_ms": active * expert_bytes / (copy_gbs * 1e9) * 1e3})
    return rows


# (block_m as a multiple of block_m_for's, block_n, block_k, num_warps, num_stages)
SWEEP = [(1, 64, 64, 4, 2), (1, 64, 64, 4, 3), (1, 64, 128, 4, 3), (1, 128, 64, 4, 3), (1, 128, 64, 8, 3),
         (1, 128, 128, 8, 3), (1, 64, 64, 8, 4), (1, 128, 64, 8, 4), (2, 64, 64, 4, 3), (2, 128, 64, 8, 3),
         (2, 128, 128, 8, 3), (0.5, 64, 64, 4, 3)]


def sweep_layer(eng: LLMEngine, token_counts=(1, 64, 256, 2048, 8192)) -> list:
    """The grouped products' tilings (SWEEP) against the default at each T: device ms from CUDA graphs; every
    tiling's output checked against the default's."""
    from engine.kernels.moe import TileConfig, block_m_for, fused_moe

    mc = eng.model_config
    rows = []
    for t in token_counts:
        moe, x, weights, ids, silu, _ = _layer_inputs(eng, t)
        base_bm = block_m_for(t * mc.num_experts_per_tok, mc.num_experts)
        want = fused_moe(x, moe.gate_up, moe.down, weights, ids, silu)
        default_ms = _graph_ms(lambda: fused_moe(x, moe.gate_up, moe.down, weights, ids, silu))
        best = (default_ms, "default")
        for mult, bn, bk, warps, stages in SWEEP:
            bm = int(min(128, max(16, base_bm * mult)))
            cfg = TileConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
            try:
                got = fused_moe(x, moe.gate_up, moe.down, weights, ids, silu, config=cfg)
                assert (got.float() - want.float()).abs().max().item() < 5e-2, "a tiling changed the result"
                ms = _graph_ms(lambda: fused_moe(x, moe.gate_up, moe.down, weights, ids, silu, config=cfg))
            except Exception as e:  # noqa: BLE001 - a tiling that does not build (shared memory) is skipped
                log(f"  T={t} {cfg}: {type(e).__name__}: {str(e)[:80]}")
                continue
            best = min(best, (ms, f"bm {bm} bn {bn} bk {bk} w {warps} s {stages}"))
        rows.append({"tokens": t, "default_block_m": base_bm, "default_ms": default_ms, "best_ms": best[0],
                     "best": best[1]})
        log(f"  T={t}: default {default_ms:.3f} ms, best {best[0]:.3f} ms ({best[1]})")
    return rows


def profile_step(eng: LLMEngine, out_dir: Path, batch: int = 1) -> None:
    """torch.profiler over three eager decode steps of ``batch`` rows: the top ops by device and by host time,
    printed and written to ``out_dir``/moe_profile_b{batch}.txt."""
    from torch.profiler import ProfilerActivity, profile

    decode_step_times(eng, [batch], ctx=512, iters=2)   # warm
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decode_step_times(eng, [batch], ctx=512, iters=3)
    ka = prof.key_averages()
    text = (ka.table(sort_by="self_cuda_time_total", row_limit=14) + "\n"
            + ka.table(sort_by="self_cpu_time_total", row_limit=14))
    (out_dir / f"moe_profile_b{batch}.txt").write_text(text)
    print(text[:6000])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-30b-a3b")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--output", type=int, default=512)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny random MoE model, few tokens")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--profile", action="store_true", help="GPU: one MoE layer alone at 1-8192 tokens and a "
                   "torch.profiler table of eager decode steps at batch 1, before the rest")
    p.add_argument("--skip-w", action="store_true", help="leave out the W1-style workload")
    p.add_argument("--sweep", action="store_true", help="GPU: the grouped products' tilings at 1-8192 tokens")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    # --tiny runs where the tests run: on the GPU when there is one (the fused kernels need it or TRITON_INTERPRET)
    device = "cuda" if torch.cuda.is_available() or not args.tiny else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("moe_gpu.py needs a GPU (or --tiny on the CPU)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from engine.tiny_models import make_tiny_model
            path = make_tiny_model("qwen3_moe", Path(tmp) / "tiny", seed=0)
            cfg = dict(model=str(path), device=device)
            args.requests, args.output, batches, ctx = 8, 8, (1, 8), 64
        else:
            from engine.tiny_models import write_real_shape_config
            path = write_real_shape_config(args.shape, Path(tmp) / args.shape)
            cfg = dict(model=str(path), device="cuda", dtype="bfloat16", load_format="dummy", max_num_seqs=256,
                       max_model_len=2048,
                       update_backup_bytes=0)   # no update runs here: the KV pool gets the 61 GB rollback reserve
            batches, ctx = (1, 256), 512
        t0 = time.perf_counter()
        eng = LLMEngine(EngineConfig(**cfg))
        log(f"engine: {time.perf_counter() - t0:.1f} s to load, {eng.stats()['num_total_blocks']} KV blocks")
        copy_gbs = copy_bandwidth(device, 1 << (26 if args.tiny else 30))
        res: dict = {"shape": "tiny" if args.tiny else args.shape, "copy_gbs": copy_gbs,
                     "check": check_layer(eng, device)}
        log(f"check: {res['check']}")
        if args.profile and device == "cuda":
            res["layer"] = profile_layer(eng, copy_gbs)
            print(markdown_table(["tokens", "block_m", "active experts", "device ms (graph)", "floor ms"],
                                 [[r["tokens"], r["block_m"], r["active_experts"], f"{r['device_ms']:.3f}",
                                   f"{r['floor_ms']:.3f}"] for r in res["layer"]]), flush=True)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            profile_step(eng, Path(args.out), batch=1)
        if args.sweep and device == "cuda":
            res["sweep"] = sweep_layer(eng)
            print(markdown_table(["tokens", "default block_m", "default ms", "best ms", "best tiling"],
                                 [[r["tokens"], r["default_block_m"], f"{r['default_ms']:.3f}", f"{r['best_ms']:.3f}",
                                   r["best"]] for r in res["sweep"]]), flush=True)
        decode = decode_step_times(eng, batches, ctx=ctx, iters=args.iters)
        for row in decode:
            row["floor_ms"] = (step_weight_bytes(eng, row["batch"]) + row["kv_bytes"]) / (copy_gbs * 1e9) * 1e3
        res["decode"] = decode
        lo, hi = (5, 40) if args.tiny else (100, 1024)
        prompts = w1_prompts(args.requests, lo, hi, eng.vocab_size, seed=1)
        res["w"] = None if args.skip_w else run_ours(eng, prompts, SamplingParams(max_tokens=args.output,
                                                                                   ignore_eos=True))
    rows = [[res["shape"], r["batch"], f"{r.get('graph_ms', r['eager_ms']):.2f}", f"{r['floor_ms']:.2f}",
             f"{r.get('graph_ms', r['eager_ms']) / r['floor_ms']:.2f}x"] for r in decode]
    table = markdown_table(["shape", "decode batch", "step ms", "floor ms", "step / floor"], rows)
    w = res["w"]
    summary = ((f"{w['requests']} requests x {args.output} greedy tokens: {w['tok_s']:,.0f} tok/s "
                f"({w['wall_s']:.1f} s); " if w else "")
               + f"fused vs torch MoE layer: max |diff| {res['check']['max_abs_diff_1']:.2e} (1 row), "
               f"{res['check']['max_abs_diff_256']:.2e} (256 rows), fused ran: "
               f"{res['check']['fused_ran_1'] and res['check']['fused_ran_256']}")
    print(table)
    print(summary)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "moe_gpu.json").write_text(json.dumps(res, indent=1, default=str))
    if device == "cuda" and not args.no_append:
        append_results(f"MoE on the GPU: {res['shape']} (random bf16 weights), fused MoE path", "cuda", table,
                       f"copy bandwidth {copy_gbs:.0f} GB/s; decode at context ~512, step = a CUDA graph replay "
                       f"with the runner's host work where graphs are on (the eager step: "
                       f"{', '.join(str(round(r['eager_ms'], 2)) for r in decode)} ms). {summary}. "
                       f"Time split: {w.get('time_split_s') if w else None}.")


if __name__ == "__main__":
    main()

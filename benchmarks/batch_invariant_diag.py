"""Where the batch-invariant mode loses time and where (if anywhere) it stops being invariant: a diagnostic run
for benchmarks/batch_invariant.py's findings (GPU only, prints, appends nothing).

    python benchmarks/batch_invariant_diag.py [--shape qwen2.5-0.5b] [--variants ...] [--kernels]

variants: the W1 workload (smaller: --requests x --output) with 8 probes decoded alone first, under one feature
          toggle each (defaults, prefix caching off, step budget 2048, no async scheduling, no CUDA graphs, probes
          alone on a fresh engine); per probe the first output index whose token or logprob differs (-1: none)
kernels:  the invariant matmul (its table's tiles and a sweep) against F.linear at M = 1, 64, 256 for each
          projection of the shapes, and the invariant attention against the default decode kernel
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.throughput import shape_dir, w1_prompts  # noqa: E402
from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402

VARIANTS = {
    "defaults": {},
    "no-prefix-caching": {"enable_prefix_caching": False},
    "budget-2048": {"max_num_batched_tokens": 2048},
    "budget-512": {"max_num_batched_tokens": 512},
    "no-async": {"async_scheduling": False},
    "no-graphs": {"enable_cuda_graphs": False},
    "fresh-alone": {},
}


def first_diff(a, b) -> int:
    for i, (x, y, lx, ly) in enumerate(zip(a.token_ids, b.token_ids, a.logprobs, b.logprobs)):
        if x != y or lx != ly:
            return i
    return -1


def variant(path: Path, name: str, args) -> list[int]:
    kw = dict(model=str(path), device="cuda", dtype="bfloat16", load_format="dummy", max_num_seqs=256,
              max_model_len=2048, batch_invariant=True, **VARIANTS[name])
    eng = LLMEngine(EngineConfig(**kw))
    prompts = w1_prompts(args.requests, 100, 1024, eng.vocab_size, seed=1)
    params = SamplingParams(max_tokens=args.output, ignore_eos=True)
    probes = prompts[:: max(1, len(prompts) // 8)][:8]
    if name == "fresh-alone":
        alone_eng = LLMEngine(EngineConfig(**kw))
        alone = [alone_eng.generate([p], params)[0] for p in probes]
        del alone_eng
        gc.collect()
    else:
        alone = [eng.generate([p], params)[0] for p in probes]
    outs = {tuple(o.prompt_token_ids): o for o in eng.generate(prompts, params)}
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    return [first_diff(outs[tuple(p)], a) for p, a in zip(probes, alone)]


def timed(fn, iters: int = 50) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3   # us


def kernels() -> None:
    from engine.kernels import invariant, paged_decode_attention
    from engine.kernels.attention import default_num_splits

    projections = {  # name: (N, K) of qkv, o, gate_up, down, lm_head
        "qwen2.5-0.5b": [(1152, 896), (896, 896), (9728, 896), (896, 4864), (151936, 896)],
        "llama-3.1-8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)],
    }
    sweep = [(64, 32, 64, 4, 4, 1), (64, 64, 64, 4, 4, 1), (64, 128, 64, 4, 4, 1), (64, 64, 128, 4, 3, 1),
             (64, 128, 128, 8, 3, 1), (128, 128, 64, 8, 3, 1), (16, 64, 128, 4, 4, 1), (16, 128, 128, 4, 4, 1),
             (32, 64, 128, 4, 4, 1), (64, 64, 64, 4, 4, 4), (64, 32, 64, 4, 4, 8)]
    for shape, projs in projections.items():
        for n, k in projs:
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            for m in (1, 64, 256):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = {"shape": shape, "N": n, "K": k, "M": m, "F.linear_us": round(timed(lambda: F.linear(x, w)), 1),
                       "table": str(invariant.matmul_config(n, k)),
                       "table_us": round(timed(lambda: invariant.matmul(x, w)), 1)}
                best = None
                for cfg in sweep:
                    try:
                        t = timed(lambda: invariant.matmul(x, w, config=cfg), iters=20)
                    except Exception as e:  # noqa: BLE001 - a config that does not compile here
                        print(f"  {cfg}: {type(e).__name__}", flush=True)
                        continue
                    if best is None or t < best[1]:
                        best = (cfg, t)
                row["best"], row["best_us"] = str(best[0]), round(best[1], 1)
                print(json.dumps(row), flush=True)
    for shape, (hq, hkv, d) in {"qwen2.5-0.5b": (14, 2, 64), "llama-3.1-8b": (32, 8, 128)}.items():
        for b, ctx in ((1, 512), (256, 512), (1, 4096)):
            bs = 16
            nb = b * ctx // bs + 8
            kc = torch.randn(nb, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            tables = torch.randperm(nb - 8, device="cuda")[:b * ctx // bs].view(b, -1).to(torch.int32)
            seq_lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
            qsl = torch.arange(b + 1, device="cuda", dtype=torch.int32)
            q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
            splits = default_num_splits(b, hkv, ctx, q.device)
            row = {"shape": shape, "batch": b, "ctx": ctx,
                   "default_us": round(timed(lambda: paged_decode_attention(q, kc, vc, tables, seq_lens, 0.1,
                                                                            num_splits=splits)), 1),
                   "invariant_us": round(timed(lambda: invariant.paged_attention(q, kc, vc, tables, seq_lens, qsl,
                                                                                 0.1)), 1),
                   "kv_floor_us": round(2 * b * ctx * hkv * d * 2 / 4.1e12 * 1e6, 1)}
            print(json.dumps(row), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--output", type=int, default=256)
    p.add_argument("--kernels", action="store_true")
    args = p.parse_args(argv)
    if args.kernels:
        kernels()
    with tempfile.TemporaryDirectory() as tmp:
        path = shape_dir(args.shape, Path(tmp))
        for name in [v for v in args.variants.split(",") if v]:
            print(json.dumps({"variant": name, "first_diff_per_probe": variant(path, name, args)}), flush=True)


if __name__ == "__main__":
    main()

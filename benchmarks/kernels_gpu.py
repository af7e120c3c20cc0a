"""GPU check and timing of the Triton kernels (engine/kernels), bf16, real model shapes.

    python benchmarks/kernels_gpu.py                 # needs CUDA; logs to $OUT/kernels_gpu.log when OUT is set
    python benchmarks/kernels_gpu.py --only gemv     # parts: check, decode, extend, gemv

1. Correctness on the GPU: every kernel against its oracle (reference attention backend, the model's torch
   ops) on fresh random bf16 inputs, outputs poisoned with NaN, cache slots past every context NaN too.
2. Decode attention timing at batch 1/16/64/256 x context 512/2048 (triton.testing.do_bench, median),
   split-K on (auto) and off, with achieved bandwidth = K/V bytes read / time, against the device-to-device
   copy bandwidth (bytes read + written) measured in the same run. Small cases rotate over several caches so
   the numbers are HBM, not L2.
3. One prefill (extend) timing, as TFLOP/s.
4. Projections of decode batches of 1, 2 and 4 rows: cuBLAS (with the separate RMSNorm / SiLU-and-mul
   kernel where the fused kernel replaces one) against ``engine.kernels.gemv`` (norm_gemv for qkv and
   gate_up, gemv for o, silu_mul_gemv for down), each timed inside a CUDA graph that runs the call over
   distinct weight copies (>= 256 MiB in all, so every weight read comes from HBM), against the floor
   = weight bytes / copy bandwidth. Appended to benchmarks/RESULTS.md unless --no-record.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.testing  # noqa: E402

from engine.attention import TorchReferenceBackend, build_metadata  # noqa: E402
from engine.attention.triton_backend import TritonBackend  # noqa: E402
from engine.kernels import (apply_rotary_, default_num_splits, gemv, greedy_sample,  # noqa: E402
                            norm_gemv, paged_decode_attention, paged_extend_attention, rms_norm,
                            rotary_store_kv, silu_and_mul, silu_mul_gemv, store_kv)
from engine.models.decoder import RMSNorm, apply_rotary  # noqa: E402

DEV = "cuda"
DT = torch.bfloat16
SHAPES = {  # name: (Hq, Hkv, D, hidden, intermediate)
    "qwen2.5-0.5b": (14, 2, 64, 896, 4864),
    "llama-3.1-8b": (32, 8, 128, 4096, 14336),
}
QKV_BIAS = {"qwen2.5-0.5b": True, "llama-3.1-8b": False}
BLOCK_SIZE = 16
_LOG: list[str] = []
_FAILED: list[str] = []


def log(line: str = "") -> None:
    print(line, flush=True)
    _LOG.append(line)


def bench(fn) -> float:
    """Median milliseconds."""
    try:
        return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
    except TypeError:  # older signature
        return triton.testing.do_bench(fn, warmup=50, rep=200, quantiles=[0.5])


def check(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2) -> None:
    got, ref = got.float(), ref.float()
    nan = bool(got.isnan().any())
    rel = float((got - ref).norm() / ref.norm().clamp_min(1e-30)) if not nan else float("nan")
    ok = not nan and rel <= tol
    if not ok:
        _FAILED.append(name)
    log(f"  {'PASS' if ok else 'FAIL'}  {name:<52} rel_err={rel:.2e}{'  (NaN!)' if nan else ''}")


# --------------------------------------------------------------------------------------------- correctness
def paged_batch(query_lens, seq_lens, hq, hkv, d, spare=2):
    needed = [-(-s // BLOCK_SIZE) for s in seq_lens]
    nb = sum(needed) + spare * len(seq_lens) + 1
    perm = torch.randperm(nb).tolist()
    tables, i = [], 0
    for n in needed:
        tables.append(perm[i:i + n + spare])
        i += n + spare
    meta = build_metadata(query_lens, seq_lens, tables, BLOCK_SIZE, DEV)
    full = build_metadata(seq_lens, seq_lens, tables, BLOCK_SIZE, DEV)
    caches = []
    for _ in range(2):
        c = torch.full((nb, BLOCK_SIZE, hkv, d), float("nan"), dtype=DT, device=DEV)
        c.view(-1, hkv, d)[full.slot_mapping] = torch.randn(len(full.slot_mapping), hkv, d, device=DEV, dtype=DT)
        caches.append(c)
    T = sum(query_lens)
    q, k, v = (torch.randn(T, h, d, device=DEV, dtype=DT) for h in (hq, hkv, hkv))
    return meta, caches, q, k, v


def check_attention(name: str, hq: int, hkv: int, d: int) -> None:
    scale = d ** -0.5
    cases = {
        "decode": ([1] * 24, torch.randint(1, 4000, (24,)).tolist()),
        "mixed": ([700, 1, 129, 1, 33, 512], [700, 3100, 1500, 17, 2000, 512]),
    }
    for case, (qls, sls) in cases.items():
        meta, (kc, vc), q, k, v = paged_batch(qls, sls, hq, hkv, d)
        kr, vr = kc.clone(), vc.clone()
        ref = TorchReferenceBackend().forward(q, k, v, kr, vr, meta, scale)
        store_kv(k, v, kc, vc, meta.slot_mapping)
        check(f"{name} store_kv ({case})", torch.nan_to_num(kc, nan=7.0), torch.nan_to_num(kr, nan=7.0), 0.0)
        if case == "decode":
            for splits in (1, 4, default_num_splits(len(qls), hkv, max(sls), q.device)):
                out = torch.full_like(q, float("nan"))
                paged_decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens_tensor, scale,
                                       num_splits=splits, out=out)
                check(f"{name} decode splits={splits}", out, ref)
        out = torch.full_like(q, float("nan"))
        paged_extend_attention(q, kc, vc, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc,
                               max(qls), scale, out=out)
        check(f"{name} extend ({case})", out, ref)
        kb, vb = kr.clone(), vr.clone()  # backend end to end (stores again: idempotent)
        check(f"{name} TritonBackend.forward ({case})", TritonBackend().forward(q, k, v, kb, vb, meta, scale), ref)


def check_elementwise(name: str, hq: int, hkv: int, d: int, hidden: int, inter: int) -> None:
    T = 1000
    norm = RMSNorm(hidden, 1e-6, DT).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, device=DEV))
        x, r = torch.randn(T, hidden, device=DEV, dtype=DT), torch.randn(T, hidden, device=DEV, dtype=DT)
        out, res = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        rms_norm(x, norm.weight, 1e-6, r, out=out, residual_out=res)
        check(f"{name} rms_norm+residual", out, norm(x + r), 1e-2)
        check(f"{name} rms_norm new residual (exact)", res, x + r, 0.0)
        g = 3 * torch.randn(T, 2 * inter, device=DEV, dtype=DT)
        o = torch.full((T, inter), float("nan"), device=DEV, dtype=DT)
        silu_and_mul(g, out=o)
        gate, up = g.chunk(2, -1)
        check(f"{name} silu_and_mul", o, torch.nn.functional.silu(gate) * up, 1e-2)
        qkv = torch.randn(T, (hq + 2 * hkv) * d, device=DEV, dtype=DT)
        q, k = qkv[:, :hq * d].view(T, hq, d), qkv[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
        ang = torch.rand(T, d // 2, device=DEV) * 1000
        cos, sin = ang.cos().to(DT), ang.sin().to(DT)
        qe, ke = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        apply_rotary_(q, k, cos, sin)
        check(f"{name} apply_rotary_ q", q, qe, 1e-2)
        check(f"{name} apply_rotary_ k", k, ke, 1e-2)
        # rotary + KV store in one kernel, every slot distinct, caches poisoned
        qkv = torch.randn(T, (hq + 2 * hkv) * d, device=DEV, dtype=DT)
        q, k = qkv[:, :hq * d].view(T, hq, d), qkv[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
        v = qkv[:, (hq + hkv) * d:].view(T, hkv, d)
        qe, ke = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        nb = -(-T // BLOCK_SIZE)
        kc = torch.full((nb, BLOCK_SIZE, hkv, d), float("nan"), device=DEV, dtype=DT)
        vc = torch.full_like(kc, float("nan"))
        slots = torch.randperm(nb * BLOCK_SIZE, device=DEV)[:T]
        rotary_store_kv(q, k, v, cos, sin, kc, vc, slots)
        check(f"{name} rotary_store_kv q", q, qe, 1e-2)
        check(f"{name} rotary_store_kv k cache", kc.view(-1, hkv, d)[slots], ke, 1e-2)
        check(f"{name} rotary_store_kv v cache (exact)", vc.view(-1, hkv, d)[slots], v, 0.0)
        # greedy sampling over a real vocab
        logits = (4 * torch.randn(64, 151936, device=DEV)).to(DT)
        ids, pair = greedy_sample(logits)
        lf = logits.float()
        check(f"{name} greedy_sample ids (exact)", ids.float(), lf.argmax(-1).float(), 0.0)
        check(f"{name} greedy_sample logprobs", pair[1], (lf.max(-1).values - torch.logsumexp(lf, -1)).double(), 1e-5)
        # matrix-vector projections, 1-4 rows
        wq = torch.randn((hq + 2 * hkv) * d, hidden, device=DEV, dtype=DT) / hidden ** 0.5
        wd = torch.randn(hidden, inter, device=DEV, dtype=DT) / inter ** 0.5
        bias = torch.randn(wq.shape[0], device=DEV, dtype=DT)
        for rows in (1, 2, 3, 4):
            x, r = torch.randn(rows, hidden, device=DEV, dtype=DT), torch.randn(rows, hidden, device=DEV, dtype=DT)
            check(f"{name} gemv M={rows}", gemv(x, wq, bias), torch.nn.functional.linear(x, wq, bias), 2e-2)
            y, new_res = norm_gemv(x, r, norm.weight, 1e-6, wq, bias)
            check(f"{name} norm_gemv M={rows}", y, torch.nn.functional.linear(norm(x + r), wq, bias), 2e-2)
            check(f"{name} norm_gemv residual M={rows} (exact)", new_res, x + r, 0.0)
            gu = 3 * torch.randn(rows, 2 * inter, device=DEV, dtype=DT)
            gate, up = gu.chunk(2, -1)
            check(f"{name} silu_mul_gemv M={rows}", silu_mul_gemv(gu, wd),
                  torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, wd), 2e-2)


# ------------------------------------------------------------------------------------------------- timing
def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB: (read + write) bytes / median time, in GB/s."""
    n = 1 << 29  # bf16 elements = 1 GiB
    src = torch.randn(n, device=DEV, dtype=DT)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * n * 2 / (ms * 1e-3) / 1e9


def time_decode(name: str, hq: int, hkv: int, d: int, copy_gbs: float) -> list[tuple]:
    rows = []
    scale = d ** -0.5
    for ctx in (512, 2048):
        for batch in (1, 16, 64, 256):
            kv_bytes = batch * ctx * hkv * d * 2 * 2  # K and V, bf16
            # rotate over enough independent caches that the working set (>= 256 MiB) misses L2
            n_sets = max(1, min(1024, math.ceil((256 << 20) / kv_bytes)))
            blocks = batch * ctx // BLOCK_SIZE
            sets = []
            for _ in range(n_sets):
                kc = torch.randn(blocks, BLOCK_SIZE, hkv, d, device=DEV, dtype=DT)
                vc = torch.randn_like(kc)
                bt = torch.randperm(blocks, device=DEV, dtype=torch.int32).view(batch, -1)
                q = torch.randn(batch, hq, d, device=DEV, dtype=DT)
                sets.append((q, kc, vc, bt))
            sl = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
            auto = default_num_splits(batch, hkv, ctx, torch.device(DEV))
            res = {}
            for splits in sorted({1, auto}):
                out = torch.empty(batch, hq, d, device=DEV, dtype=DT)
                i = [0]

                def run():
                    q, kc, vc, bt = sets[i[0] % n_sets]
                    i[0] += 1
                    paged_decode_attention(q, kc, vc, bt, sl, scale, num_splits=splits, out=out)

                res[splits] = bench(run)
            ms = res[auto]
            gbs = kv_bytes / (ms * 1e-3) / 1e9
            rows.append((name, batch, ctx, auto, res[1] * 1e3, ms * 1e3, gbs, gbs / copy_gbs))
            del sets
            torch.cuda.empty_cache()
    return rows


def time_extend(name: str, hq: int, hkv: int, d: int) -> str:
    seqs, qlen = 4, 2048
    meta, (kc, vc), q, k, v = paged_batch([qlen] * seqs, [qlen] * seqs, hq, hkv, d, spare=0)
    store_kv(k, v, kc, vc, meta.slot_mapping)
    out = torch.empty_like(q)
    ms = bench(lambda: paged_extend_attention(q, kc, vc, meta.block_tables, meta.seq_lens_tensor,
                                              meta.query_start_loc, qlen, d ** -0.5, out=out))
    flops = seqs * hq * 4 * d * qlen * (qlen + 1) / 2  # causal: QK^T and PV over the lower triangle
    return f"  extend {name}: {seqs}x{qlen} causal prefill  {ms * 1e3:8.1f} us  {flops / ms / 1e9:6.1f} TFLOP/s"


def graph_us_per_call(fn, copies: int, reps: int = 20) -> float:
    """Microseconds per ``fn(i)``, i over ``copies`` distinct operands, captured in one CUDA graph and replayed
    ``reps`` times (launch gaps as inside the engine's decode graphs)."""
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps / copies * 1e3


def time_gemv(name: str, hq: int, hkv: int, d: int, hidden: int, inter: int, copy_gbs: float) -> list[list]:
    F = torch.nn.functional
    norm_w = torch.randn(hidden, device=DEV, dtype=DT)
    projections = {  # name: (N, K, kind); kind picks the fused kernel and what it replaces
        "qkv": ((hq + 2 * hkv) * d, hidden, "norm"), "o": (hidden, hq * d, "plain"),
        "gate_up": (2 * inter, hidden, "norm"), "down": (hidden, inter, "silu"),
    }
    rows = []
    for proj, (n, k, kind) in projections.items():
        copies = max(4, min(64, (256 << 20) // (n * k * 2)))
        ws = [torch.randn(n, k, device=DEV, dtype=DT) / k ** 0.5 for _ in range(copies)]
        bias = torch.randn(n, device=DEV, dtype=DT) if proj == "qkv" and QKV_BIAS[name] else None
        for m in (1, 2, 4):
            x = torch.randn(m, 2 * k if kind == "silu" else k, device=DEV, dtype=DT)
            res = torch.randn(m, k, device=DEV, dtype=DT)
            if kind == "norm":
                def ours(i):
                    return norm_gemv(x, res, norm_w, 1e-6, ws[i], bias)
                def theirs(i):
                    return F.linear(rms_norm(x, norm_w, 1e-6, res)[0], ws[i], bias)
            elif kind == "silu":
                def ours(i):
                    return silu_mul_gemv(x, ws[i])
                def theirs(i):
                    return F.linear(silu_and_mul(x), ws[i])
            else:
                def ours(i):
                    return gemv(x, ws[i], bias)
                def theirs(i):
                    return F.linear(x, ws[i], bias)
            t_ours, t_theirs = graph_us_per_call(ours, copies), graph_us_per_call(theirs, copies)
            floor = n * k * 2 / (copy_gbs * 1e9) * 1e6   # W's bytes at the copy rate (as benchmarks/throughput.py)
            fused = {"norm": " + rms_norm", "silu": " + silu_and_mul", "plain": ""}[kind]
            rows.append([name, proj + fused, f"{n}x{k}", m, f"{t_theirs:.2f}", f"{t_ours:.2f}", f"{floor:.2f}",
                         f"{t_theirs / t_ours:.2f}x"])
        ws.clear()
        torch.cuda.empty_cache()
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="check,decode,extend,gemv", help="comma-separated parts to run")
    ap.add_argument("--no-record", action="store_true", help="do not append the gemv table to RESULTS.md")
    args = ap.parse_args(argv)
    args.only = set(args.only.split(","))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    assert torch.cuda.is_available(), "this benchmark needs CUDA"
    torch.manual_seed(int(time.time()))
    log(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    if "check" in args.only:
        log("correctness (bf16, poisoned outputs, rel err = |out-ref| / |ref|):")
        for name, (hq, hkv, d, hidden, inter) in SHAPES.items():
            check_attention(name, hq, hkv, d)
            check_elementwise(name, hq, hkv, d, hidden, inter)
    copy_gbs = copy_bandwidth()
    log(f"\ncopy bandwidth (1 GiB d2d, read+write): {copy_gbs:.0f} GB/s")
    if "decode" in args.only:
        rows = []
        for name, (hq, hkv, d, _, _) in SHAPES.items():
            rows += time_decode(name, hq, hkv, d, copy_gbs)
        log("\ndecode attention (median; bandwidth = K/V bytes read / time):")
        log(f"  {'shape':<14}{'batch':>6}{'ctx':>6}{'splits':>7}{'us(1 split)':>13}{'us(auto)':>10}"
            f"{'GB/s':>8}{'of copy':>9}")
        for name, b, c, s, t1, ta, gbs, frac in rows:
            log(f"  {name:<14}{b:>6}{c:>6}{s:>7}{t1:>13.1f}{ta:>10.1f}{gbs:>8.0f}{frac:>8.0%}")
    if "extend" in args.only:
        log("")
        for name, (hq, hkv, d, _, _) in SHAPES.items():
            log(time_extend(name, hq, hkv, d))
    if "gemv" in args.only:
        from benchmarks.report import append_results, markdown_table
        rows = []
        for name, (hq, hkv, d, hidden, inter) in SHAPES.items():
            rows += time_gemv(name, hq, hkv, d, hidden, inter, copy_gbs)
        table = markdown_table(["shape", "projection (cuBLAS side)", "W [N x K]", "rows", "cuBLAS us",
                                "matrix-vector us", "floor us", "speed-up"], rows)
        log("\n" + table)
        notes = (f"Each call timed inside one CUDA graph over distinct weight copies (>= 256 MiB, read from HBM), "
                 f"bf16; floor = weight bytes / {copy_gbs:.0f} GB/s (the copy bandwidth, read + write bytes, as in throughput.py). The cuBLAS side runs "
                 "the separate rms_norm (with residual) / silu_and_mul kernel that the fused kernel replaces.")
        log(notes)
        if not args.no_record:
            append_results("kernels_gpu --only gemv: matrix-vector kernels vs cuBLAS", DEV, table, notes)
    log(f"\n{'ALL PASS' if not _FAILED else 'FAILED: ' + ', '.join(_FAILED)}")
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "kernels_gpu.log").write_text("\n".join(_LOG) + "\n")
    return 1 if _FAILED else 0


if __name__ == "__main__":
    sys.exit(main())

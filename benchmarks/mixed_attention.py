"""Attention of a mixed step on the GPU: the extend kernel over a work list (as the mixed-step CUDA graphs run
it) with and without split-KV, against the decode kernel on the step's decode rows alone and the bandwidth
floor (K/V bytes read / device copy bandwidth measured in the same run).

Why: a mixed step of benchmarks/multi_turn.py is ~30 decode rows and a few observations of ~100 tokens, all
over histories of 1-2k tokens. Without splits the extend kernel runs one program per (tile, kv head), fewer
than the SMs on a small-head model, each walking its whole history serially.

    python benchmarks/mixed_attention.py            # needs CUDA; both shapes; appends to benchmarks/RESULTS.md

Cases (bf16, blocks of 16, each sequence's blocks scattered over the cache; the working set rotates over
enough caches to miss L2):
  ours-like        30 decode rows + 3 observations of 100 tokens, contexts 800-2400
  recompute-like   30 decode rows + 4 re-prefills of 280 tokens over contexts 0-1200
Per shape and case: median us per layer call of the tiled extend kernel at each split setting, the decode
kernel on the decode rows alone (split-K auto), and the floor. Then the decode kernel at a decode step of 32
rows over the same contexts, by split count and KV tile width, against the split count the decode graphs use.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton.testing  # noqa: E402

from benchmarks.report import append_results, markdown_table  # noqa: E402
from engine.attention import build_metadata  # noqa: E402
from engine.attention.reference import TorchReferenceBackend  # noqa: E402
from engine.kernels import default_num_splits, paged_decode_attention, paged_extend_attention  # noqa: E402
from engine.kernels.extend_attention import extend_tile_tokens  # noqa: E402
from engine.step_inputs import extend_tiles  # noqa: E402

BS = 16
DT = torch.bfloat16
SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "llama-3.1-8b": (32, 8, 128)}
SPLITS = [(1, 8), (2, 8), (4, 8), (4, 4), (8, 4), (8, 2)]     # (max_splits, split_tiles)


def bench(fn) -> float:
    """Median milliseconds."""
    try:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    except TypeError:
        return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])


def copy_bandwidth() -> float:
    n = 1 << 29
    src = torch.randn(n, device="cuda", dtype=DT)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n * 2 / (ms * 1e-3) / 1e9


def case(name: str, rng: random.Random) -> tuple[list[int], list[int]]:
    """(query_lens, seq_lens) of one step: decode rows first, then the prefill chunks."""
    if name == "ours-like":
        chunks = [(100, rng.randint(800, 2400)) for _ in range(3)]
    else:
        chunks = [(280, rng.randint(0, 1200)) for _ in range(4)]
    decodes = [(1, rng.randint(800, 2400)) for _ in range(30)]
    rows = decodes + chunks
    return [q for q, _ in rows], [q + c for q, c in rows]


class Sets:
    """``copies`` independent caches and block tables of the same step (rotated to miss L2)."""

    def __init__(self, query_lens, seq_lens, hq, hkv, d, copies):
        needed = [-(-s // BS) for s in seq_lens]
        nb = sum(needed)
        self.sets = []
        for _ in range(copies):
            perm = torch.randperm(nb).tolist()
            tables, i = [], 0
            for n in needed:
                tables.append(perm[i:i + n])
                i += n
            meta = build_metadata(query_lens, seq_lens, tables, BS, "cuda")
            kc = torch.randn(nb, BS, hkv, d, device="cuda", dtype=DT)
            vc = torch.randn_like(kc)
            q = torch.randn(sum(query_lens), hq, d, device="cuda", dtype=DT)
            self.sets.append((meta, kc, vc, q))
        self.i = 0

    def next(self):
        s = self.sets[self.i % len(self.sets)]
        self.i += 1
        return s


def run_shape(shape: str, copy_gbs: float, rows: list, failures: list) -> None:
    hq, hkv, d = SHAPES[shape]
    scale = d ** -0.5
    toks = extend_tile_tokens(hq, hkv, d)
    for cname in ("ours-like", "recompute-like"):
        query_lens, seq_lens = case(cname, random.Random(0))
        kv_bytes = sum(seq_lens) * hkv * d * 2 * 2
        copies = max(2, math.ceil((256 << 20) / kv_bytes))
        sets = Sets(query_lens, seq_lens, hq, hkv, d, copies)
        t = sum(query_lens)
        work = np.full(-(-t // toks) + len(query_lens), -1, np.int32)
        extend_tiles(np.array(query_lens), toks, work)
        tiles = torch.from_numpy(work).cuda()
        # correctness of every split setting against the torch reference (first set)
        meta, kc, vc, q = sets.sets[0]
        k_new = kc.view(-1, hkv, d)[meta.slot_mapping]     # the new tokens' K/V already sit in the cache
        v_new = vc.view(-1, hkv, d)[meta.slot_mapping]
        ref = TorchReferenceBackend().forward(q, k_new, v_new, kc.clone(), vc.clone(), meta, scale)
        base = None
        outs = {}
        for ms_, st in SPLITS:
            out = torch.zeros_like(q)
            paged_extend_attention(q, kc, vc, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc, 0,
                                   scale, out=out, tiles=tiles, max_splits=ms_, split_tiles=st)
            outs[(ms_, st)] = out
            if base is None:
                base = out
            err = float((out.float() - base.float()).abs().max())
            if not math.isfinite(err) or err > 2e-2:
                failures.append(f"{shape} {cname} splits {ms_}/{st}: max |diff| vs unsplit {err:.3g}")
        for key, out in outs.items():
            err = float((out.float() - ref.float()).abs().max())
            if not math.isfinite(err) or err > 2e-2:
                failures.append(f"{shape} {cname} splits {key[0]}/{key[1]} vs the torch reference: {err:.3g}")
        timings = {}
        for ms_, st in SPLITS:
            out = torch.zeros_like(q)

            def run(ms_=ms_, st=st, out=out):
                meta, kc, vc, q = sets.next()
                paged_extend_attention(q, kc, vc, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc,
                                       0, scale, out=out, tiles=tiles, max_splits=ms_, split_tiles=st)
            timings[(ms_, st)] = bench(run) * 1e3
        nd = sum(1 for x in query_lens if x == 1)
        dec_sl = torch.tensor(seq_lens[:nd], dtype=torch.int32, device="cuda")
        auto = default_num_splits(nd, hkv, max(seq_lens[:nd]), torch.device("cuda"))
        dec_out = torch.empty(nd, hq, d, device="cuda", dtype=DT)

        def run_dec():
            meta, kc, vc, q = sets.next()
            paged_decode_attention(q[:nd], kc, vc, meta.block_tables[:nd], dec_sl, scale, num_splits=auto,
                                   out=dec_out)
        dec_us = bench(run_dec) * 1e3
        floor_us = kv_bytes / (copy_gbs * 1e9) * 1e6   # the roofline: bytes moved / copy bandwidth
        best = min(timings, key=timings.get)
        rows.append([shape, cname, f"{len(query_lens)} / {t}", f"{kv_bytes / 1e6:.1f}",
                     *(f"{timings[k]:.1f}" for k in SPLITS), f"{best[0]}/{best[1]}",
                     f"{timings[(1, 8)] / timings[best]:.2f}x", f"{dec_us:.1f} (splits {auto})", f"{floor_us:.1f}"])
        print(rows[-1], flush=True)
        sets.sets.clear()   # free the caches before the next case
        torch.cuda.empty_cache()


DECODE_SPLITS = (1, 2, 4, 8, 16)
DECODE_BLOCK_N = (32, 64, 128)


def run_decode_sweep(shape: str, copy_gbs: float, rows: list, batch: int = 32) -> None:
    """The decode kernel at a multi_turn decode step (batch rows, contexts 800-2400) over split counts and KV
    tile widths: what the decode graphs could use instead of their frozen split count."""
    hq, hkv, d = SHAPES[shape]
    rng = random.Random(1)
    seq_lens = [rng.randint(800, 2400) for _ in range(batch)]
    kv_bytes = sum(seq_lens) * hkv * d * 2 * 2
    sets = Sets([1] * batch, seq_lens, hq, hkv, d, max(2, math.ceil((256 << 20) / kv_bytes)))
    sl = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    out = torch.empty(batch, hq, d, device="cuda", dtype=DT)
    from engine.cuda_graphs import decode_splits
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    frozen = decode_splits(batch, hkv, sms)
    floor_us = kv_bytes / (copy_gbs * 1e9) * 1e6
    for bn in DECODE_BLOCK_N:
        cells = []
        for splits in DECODE_SPLITS:
            def run(splits=splits, bn=bn):
                meta, kc, vc, q = sets.next()
                paged_decode_attention(q, kc, vc, meta.block_tables, sl, d ** -0.5, num_splits=splits, out=out,
                                       block_n=bn)
            cells.append(bench(run) * 1e3)
        rows.append([shape, batch, bn, *(f"{c:.1f}" for c in cells), frozen, f"{floor_us:.1f}",
                     f"{floor_us / min(cells):.0%}"])
        print(rows[-1], flush=True)
    sets.sets.clear()
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("mixed_attention: needs CUDA", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth()
    rows, failures = [], []
    for shape in args.shapes.split(","):
        run_shape(shape, copy_gbs, rows, failures)
    header = ["shape", "case", "rows / tokens", "KV MB read", *(f"extend {a}/{b} us" for a, b in SPLITS),
              "best (splits/min tiles)", "best vs unsplit", "decode kernel, decode rows only, us",
              "floor us (KV bytes / copy bw)"]
    table = markdown_table(header, rows)
    decode_rows: list = []
    for shape in args.shapes.split(","):
        run_decode_sweep(shape, copy_gbs, decode_rows)
    decode_table = markdown_table(
        ["shape", "batch", "KV tile (keys)", *(f"{n} splits us" for n in DECODE_SPLITS), "graphs' splits now",
         "floor us", "best vs floor"], decode_rows)
    table += "\n\nDecode kernel at a decode step of the workload (contexts 800-2400), by split count and KV tile:\n\n" \
        + decode_table
    print(table)
    for f in failures:
        print("FAIL", f)
    if not args.no_results:
        append_results("mixed_attention: one layer's attention of a mixed step, split-KV extend", "cuda", table,
                       notes=f"Device-to-device copy bandwidth in the same run: {copy_gbs:.0f} GB/s (read + write). "
                       "extend a/b = the tiled extend kernel (as the mixed-step graphs run it) with at most a KV "
                       "splits a tile, each of at least b tiles of 64 keys; 1/8 = no split. Correctness: every "
                       f"setting within 2e-2 of the unsplit kernel ({'all passed' if not failures else 'FAILED'}).")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

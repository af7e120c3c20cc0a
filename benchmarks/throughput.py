"""Throughput of the engine on random-weight models of real shapes (bf16), against its floor and transformers.

    python benchmarks/throughput.py                       # GPU: everything below
    python benchmarks/throughput.py --only decode,w1      # subsets: check, copy, decode, w1, w2, w3
    python benchmarks/throughput.py --tiny                # CPU smoke test (tiny shape, few tokens)

  (the measurement helpers, shared with other benchmarks, are benchmarks/engine_timing.py)
  copy    device-to-device copy bandwidth, 1 GiB, counting bytes read + written (the floor's denominator)
  decode  one engine step (``ModelRunner.execute``: inputs, forward, logits, sampling, the host sync) of B
          1-token decodes at context ~512, CUDA graphs on and off, vs floor = (weight bytes + KV bytes read)
          / copy bandwidth; qwen2.5-0.5b and llama-3.1-8b shapes
  w1      256 requests, prompts uniform 100-1024 tokens, exactly 512 output tokens (ignore_eos), qwen2.5-0.5b:
          output tok/s of this engine and of transformers' continuous batching ``generate_batch`` (on a
          subset of the requests when --hf-requests is smaller; the table says so)
  w2      GRPO: 64 prompts x n=8, prompt 512, outputs 256-1024 (per prompt), temperature 1: tok/s and the
          prefill statistics that show each group's prompt computed once
  w3      w1 on the llama-3.1-8b shape (--w3-requests)

Prints a table, appends it to benchmarks/RESULTS.md with the card name (GPU runs; --no-record skips),
writes results JSON and a PNG (tok/s and step time vs batch) to --out-dir (default $OUT or benchmarks/).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_timing import (copy_bandwidth, decode_step_times, engine_step_ms, log,  # noqa: E402,F401
                                      run_ours, sync, w1_prompts, weight_bytes_read)
from benchmarks.report import append_results, card_name, markdown_table  # noqa: E402
from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402

DECODE_BATCHES = (1, 16, 64, 256)


# ------------------------------------------------------------------------------------------------ engines
def shape_dir(shape: str, root: Path) -> Path:
    from engine.tiny_models import make_tiny_model, write_real_shape_config
    if shape == "tiny":
        return make_tiny_model("qwen2", root / "tiny", seed=0)
    return write_real_shape_config(shape, root / shape)


def make_engine(path: Path, args, shape: str, **kw) -> LLMEngine:
    cfg = dict(model=str(path), device=args.device, dtype=args.dtype,
               load_format="safetensors" if shape == "tiny" else "dummy", max_model_len=args.max_model_len,
               max_num_seqs=256, max_num_batched_tokens=args.max_batched_tokens, decode_gemv=args.decode_gemv)
    cfg.update(kw)
    t0 = time.perf_counter()
    eng = LLMEngine(EngineConfig(**cfg))
    log(f"  engine {shape}: {time.perf_counter() - t0:.1f} s to load (+ graph capture: "
        f"{'yes' if eng.runner.graphs is not None else 'no'}), {eng.stats()['num_total_blocks']} KV blocks")
    return eng


def run_transformers(path: Path, prompts, max_new: int, args) -> dict:
    """transformers' continuous batching (``generate_batch``) on the same shape, random bf16 weights."""
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = transformers.AutoConfig.from_pretrained(str(path))
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    gc = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    sig = inspect.signature(model.generate_batch).parameters
    kw = {k: v for k, v in dict(progress_bar=False).items() if k in sig}
    model.generate_batch(inputs=[p[:32] for p in prompts[:2]],
                         generation_config=GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None,
                                                            pad_token_id=0), **kw)  # warm-up
    sync(args.device)
    t0 = time.perf_counter()
    res = model.generate_batch(inputs=prompts, generation_config=gc, **kw)
    sync(args.device)
    wall = time.perf_counter() - t0
    n_out = sum(len(r.generated_tokens) for r in res.values())
    del model
    torch.cuda.empty_cache() if args.device.startswith("cuda") else None
    return {"requests": len(prompts), "output_tokens": n_out, "wall_s": wall, "tok_s": n_out / wall,
            "transformers": transformers.__version__}


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="check,copy,decode,w1,w2,w3")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, few tokens")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--decode-ctx", type=int, default=512)
    ap.add_argument("--decode-iters", type=int, default=30)
    ap.add_argument("--no-pdl", action="store_true", help="launch the Triton kernels without programmatic "
                    "dependent launch (engine.kernels.pdl), for comparison")
    ap.add_argument("--decode-gemv", default="auto", choices=("auto", "on", "off"),
                    help="EngineConfig.decode_gemv: matrix-vector kernels for decode batches of 1-4 rows")
    ap.add_argument("--w1-requests", type=int, default=256)
    ap.add_argument("--w1-output", type=int, default=512)
    ap.add_argument("--hf-requests", type=int, default=64, help="transformers baseline runs this many of W1's")
    ap.add_argument("--hf-w3-requests", type=int, default=16, help="transformers baseline on W3 (0: skip)")
    ap.add_argument("--w2-prompts", type=int, default=64)
    ap.add_argument("--w3-requests", type=int, default=256)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda and not args.tiny else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.tiny:
        args.max_model_len = 256
        args.decode_ctx, args.decode_iters = 64, 3
        args.w1_requests, args.w1_output, args.hf_requests, args.w2_prompts, args.w3_requests = 4, 8, 2, 2, 2
        args.max_batched_tokens = 512
    args.only = set(args.only.split(","))
    args.out_dir = Path(args.out_dir or os.environ.get("OUT") or Path(__file__).parent)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.no_pdl:
        from engine.kernels import pdl
        pdl.set_enabled(False)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="throughput-"))
    small, large = ("tiny", "tiny") if args.tiny else ("qwen2.5-0.5b", "llama-3.1-8b")
    res: dict = {"device": card_name(args.device), "dtype": args.dtype, "torch": torch.__version__, "decode": {},
                 "tiny": args.tiny}
    log(f"throughput on {res['device']} ({args.dtype}), torch {torch.__version__}")
    if "copy" in args.only or "decode" in args.only:
        res["copy_gbps"] = copy_bandwidth(args.device, (1 << 30) if args.device.startswith("cuda") else (64 << 20))
        log(f"copy bandwidth: {res['copy_gbps']:.0f} GB/s (read + write)")

    small_path, large_path = shape_dir(small, root), shape_dir(large, root)
    # One engine alive at a time: each sizes its KV cache from the free memory.
    if args.only & {"check", "decode", "w1", "w2"}:
        eng = make_engine(small_path, args, small)
        if "check" in args.only:
            res["check"] = correctness_checks(eng, args, root)
        if "decode" in args.only:
            decode_rows(res, eng, small, args)
        if "w1" in args.only:
            res["w1"] = run_ours(eng, w1_set(args, eng.vocab_size, seed=1),
                                 SamplingParams(max_tokens=args.w1_output, ignore_eos=True))
            log(f"  W1 ours: {res['w1']}")
            save(res, args)
        if "w2" in args.only:
            rng = random.Random(2)
            plen = 512 if not args.tiny else 20
            prompts = [[rng.randrange(eng.vocab_size) for _ in range(plen)] for _ in range(args.w2_prompts)]
            params = [SamplingParams(n=8, temperature=1.0, ignore_eos=True,
                                     max_tokens=rng.randint(256, 1024) if not args.tiny else 8) for _ in prompts]
            res["w2"] = run_ours(eng, prompts, params)
            res["w2"]["prompt_tokens_once"] = args.w2_prompts * plen
            res["w2"]["prompt_tokens_all_samples"] = 8 * args.w2_prompts * plen
            log(f"  W2 ours: {res['w2']}")
            save(res, args)
        vocab = eng.vocab_size
        del eng
        free_memory(args)
        if "w1" in args.only and not args.no_hf:
            res["w1_hf"] = baseline(small_path, w1_set(args, vocab, seed=1)[:args.hf_requests], args)
            log(f"  W1 transformers: {res['w1_hf']}")
    if args.only & {"decode", "w3"} and not args.tiny:
        eng = make_engine(large_path, args, large)
        if "decode" in args.only:
            decode_rows(res, eng, large, args)
        if "w3" in args.only:
            w3 = w1_set(args, eng.vocab_size, seed=3)[:args.w3_requests]
            res["w3"] = run_ours(eng, w3, SamplingParams(max_tokens=args.w1_output, ignore_eos=True))
            log(f"  W3 ours: {res['w3']}")
            save(res, args)
        del eng
        free_memory(args)
        if "w3" in args.only and args.hf_w3_requests and not args.no_hf:
            res["w3_hf"] = baseline(large_path, w3[:args.hf_w3_requests], args)
            log(f"  W3 transformers: {res['w3_hf']}")

    save(res, args)
    table, notes = tables(res, args)
    log("\n" + table + "\n\n" + notes)
    if args.device.startswith("cuda"):
        plot(res, args.out_dir / "throughput.png")
    if not args.no_record and args.device.startswith("cuda"):
        append_results("throughput: decode step vs floor, W1/W2/W3 vs transformers", args.device, table, notes)
        (args.out_dir / "RESULTS_section.md").write_text(table + "\n\n" + notes + "\n")
    return res


def save(res: dict, args) -> None:
    (args.out_dir / "throughput.json").write_text(json.dumps(res, indent=1, default=str))


def w1_set(args, vocab: int, seed: int) -> list[list[int]]:
    lo, hi = (100, 1024) if not args.tiny else (5, 40)
    return w1_prompts(args.w1_requests, lo, hi, vocab, seed)


def free_memory(args) -> None:
    import gc
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()


def baseline(path: Path, prompts, args) -> dict:
    try:
        return run_transformers(path, prompts, args.w1_output, args)
    except Exception as e:  # noqa: BLE001 (a baseline failure is reported, not fatal)
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        free_memory(args)


def decode_rows(res: dict, eng: LLMEngine, shape: str, args) -> None:
    wb = weight_bytes_read(eng)
    rows = decode_step_times(eng, DECODE_BATCHES, args.decode_ctx, args.decode_iters)
    for r in rows:
        r["floor_ms"] = 1e3 * (wb + r["kv_bytes"]) / (res["copy_gbps"] * 1e9)
        log(f"  decode {shape} B={r['batch']}: graph {r.get('graph_ms', float('nan')):.3f} ms, "
            f"eager {r['eager_ms']:.3f} ms, floor {r['floor_ms']:.3f} ms")
    res["decode"][shape] = {"weight_bytes": wb, "rows": rows}
    graphs = eng.runner.graphs
    if graphs is not None:
        # what graph capture measured for batches of 1-4 rows: matrix-vector kernels vs cuBLAS
        res["decode"][shape]["gemv"] = {bs: {"chosen": graphs.gemv[bs], **graphs.timings.get(bs, {})}
                                        for bs in graphs.sizes if bs <= 4}
        log(f"  decode {shape} graphs with matrix-vector kernels: {res['decode'][shape]['gemv']}")
    save(res, args)


def correctness_checks(eng: LLMEngine, args, root: Path) -> dict:
    """Before timing: graph decode == eager decode (greedy tokens) on this engine, and the fast path's greedy
    tokens == the reference backend's on a tiny fp32 model."""
    from engine.tiny_models import make_tiny_model
    out = {}
    rng = random.Random(0)
    prompts = [[rng.randrange(eng.vocab_size) for _ in range(rng.randrange(5, min(300, args.max_model_len - 30)))] for _ in range(37)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    graphed = eng.generate(prompts, params)
    eng.runner.use_cuda_graphs = False
    eager = eng.generate(prompts, params)
    eng.runner.use_cuda_graphs = True
    same = sum(a.token_ids == b.token_ids for a, b in zip(graphed, eager))
    out["graph_vs_eager_same_prompts"] = f"{same}/{len(prompts)}"
    out["graph_vs_eager_max_logprob_diff"] = max(abs(x - y) for a, b in zip(graphed, eager)
                                                 for x, y in zip(a.logprobs, b.logprobs))
    tiny = make_tiny_model("qwen2", root / "check-tiny", seed=11)
    cfg = dict(model=str(tiny), device=args.device, dtype="float32", max_model_len=256)
    tprompts = [[rng.randrange(2, 512) for _ in range(n)] for n in (1, 5, 16, 17, 33, 60, 3, 9, 100)]
    tparams = SamplingParams(max_tokens=48, ignore_eos=True)
    ref = LLMEngine(EngineConfig(attention_backend="reference", **cfg)).generate(tprompts, tparams)
    fast_eng = LLMEngine(EngineConfig(**cfg))
    fast = fast_eng.generate(tprompts, tparams)
    out["fp32_fast_vs_reference_same_prompts"] = f"{sum(a.token_ids == b.token_ids for a, b in zip(fast, ref))}/{len(tprompts)}"
    out["fp32_fast_backend"] = f"{fast_eng.backend.name}, graphs {'on' if fast_eng.runner.graphs else 'off'}"
    out["fp32_fast_vs_reference_max_logprob_diff"] = max(abs(x - y) for a, b in zip(fast, ref)
                                                         for x, y in zip(a.logprobs, b.logprobs))
    del fast_eng
    log(f"  checks: {out}")
    return out


def tables(res: dict, args) -> tuple[str, str]:
    rows = []
    for shape, d in res["decode"].items():
        for r in d["rows"]:
            g = r.get("graph_ms")
            rp = r.get("replay_ms")
            e = r.get("engine_ms")
            best = e or g or r["eager_ms"]
            rows.append([f"decode {shape}", f"B={r['batch']}, ctx {r['ctx']}", f"{e:.3f}" if e else "-",
                         f"{g:.3f}" if g else "-", f"{rp:.3f}" if rp else "-", f"{r['eager_ms']:.3f}", f"{r['floor_ms']:.3f}",
                         f"{best / r['floor_ms']:.2f}x", f"{r['batch'] / best * 1e3:,.0f}"])
    head = ["what", "setting", "engine step ms", "graph step ms (sync)", "graph replay ms (GPU)", "eager step ms",
            "floor ms", "engine step / floor", "tok/s"]
    t1 = markdown_table(head, rows) if rows else ""
    wrows = []
    for key, label in (("w1", "W1 (0.5b, 256 x 512 out)"), ("w2", "W2 GRPO (0.5b, 64 x n=8)"),
                       ("w3", "W3 (8b)")):
        w = res.get(key)
        if not w:
            continue
        hf = res.get(f"{key}_hf") or {}
        hf_tok = hf.get("tok_s")
        wrows.append([label, w["requests"], w["samples"], w["output_tokens"], f"{w['wall_s']:.1f}",
                      f"{w['tok_s']:,.0f}",
                      f"{hf_tok:,.0f} ({hf['requests']} req)" if hf_tok else (hf.get("error", "-")[:60] or "-"),
                      f"{w['tok_s'] / hf_tok:.1f}x" if hf_tok else "-",
                      w["prefill_tokens"], w["cached_prompt_tokens"]])
    t2 = markdown_table(["workload", "requests", "samples", "output tokens", "wall s", "ours tok/s",
                         "transformers tok/s", "ratio", "prefill tokens", "cached prompt tokens"], wrows) if wrows else ""
    if "check" in res:
        t2 += "\n\nChecks before timing: " + ", ".join(f"{k} = {v}" for k, v in res["check"].items())
    notes = [f"Copy bandwidth {res.get('copy_gbps', 0):,.0f} GB/s (1 GiB d2d, read + write), same run; "
             f"{res['dtype']}, torch {res['torch']}. Engine step = wall time between successive "
             "`LLMEngine.step` returns with B real requests decoding (scheduling, inputs, forward, sampling, "
             "results; async scheduling overlaps the host work with the device), median. Graph / eager step = "
             "one synchronous `ModelRunner.execute` (inputs, forward, logits, greedy sampling, host sync). "
             "Floor = (weight bytes + KV bytes read) / copy BW."]
    for shape, d in res["decode"].items():
        g = d.get("gemv")
        if g:
            notes.append(f"{shape} decode graphs of 1-4 rows (decode_gemv={args.decode_gemv}): " + "; ".join(
                f"B={bs}: " + (f"matrix-vector {v['gemv']:.3f} ms vs cuBLAS {v['cublas']:.3f} ms per replay at "
                               "capture -> " if "gemv" in v else "") + ("matrix-vector" if v["chosen"] else "cuBLAS")
                for bs, v in g.items()) + ".")
    for key in ("w1", "w2", "w3"):
        if key in res and res[key].get("time_split_s"):
            sp = res[key]["time_split_s"]
            notes.append(f"{key.upper()} wall {res[key]['wall_s']:.1f} s over {res[key]['steps']} steps: "
                         + ", ".join(f"{k} {v:.1f} s" for k, v in sp.items())
                         + f"; {res[key].get('steps_ahead', 0)} steps scheduled ahead.")
    if "w1_hf" in res and "tok_s" in res["w1_hf"]:
        notes.append(f"transformers {res['w1_hf']['transformers']} `generate_batch` ran the first "
                     f"{res['w1_hf']['requests']} of W1's requests (same prompts, 512 greedy tokens; "
                     "its tok/s is measured at that load, not scaled to 256 requests).")
    if "w2" in res:
        w = res["w2"]
        notes.append(f"W2: {w['prefill_tokens']:,} prefill tokens computed for {w['samples']} samples of "
                     f"{w['requests']} prompts: one prompt = {w['prompt_tokens_once'] // w['requests']} tokens, "
                     f"all prompts once = {w['prompt_tokens_once']:,}, every sample separately = "
                     f"{w['prompt_tokens_all_samples']:,}. Temperature 1.")
    if "w3" in res and res["w3"]["requests"] < 256:
        notes.append(f"W3 ran {res['w3']['requests']} requests (W1 asks 256).")
    if "w3_hf" in res and "tok_s" in res["w3_hf"]:
        notes.append(f"W3 transformers: first {res['w3_hf']['requests']} requests only (measured at that load).")
    return (t1 + "\n\n" + t2).strip(), "\n".join(notes)


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no PNG (plot later from throughput.json with plot_from_json)")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for shape, d in res["decode"].items():
        b = [r["batch"] for r in d["rows"]]
        for mode, style in (("engine", "-s"), ("graph", "-o"), ("eager", "--x")):
            if all(f"{mode}_ms" in r for r in d["rows"]):
                ms = [r[f"{mode}_ms"] for r in d["rows"]]
                ax1.plot(b, ms, style, label=f"{shape} {mode}")
                ax2.plot(b, [x / m * 1e3 for x, m in zip(b, ms)], style, label=f"{shape} {mode}")
        ax1.plot(b, [r["floor_ms"] for r in d["rows"]], ":", label=f"{shape} floor")
        ax2.plot(b, [x / r["floor_ms"] * 1e3 for x, r in zip(b, d["rows"])], ":", label=f"{shape} floor")
    for ax, yl in ((ax1, "decode step (ms)"), (ax2, "decode tok/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(f"decode at context ~512, {res['device']}, {res['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def plot_from_json(json_path: str, png_path: str) -> None:
    plot(json.loads(Path(json_path).read_text()), Path(png_path))


if __name__ == "__main__":
    main()

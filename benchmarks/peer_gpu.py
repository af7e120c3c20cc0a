"""This engine and vLLM side by side on one GPU: the same shapes (random weights), the same token-id prompts and
session plans, the same batch limits, output tok/s and start-up time, in one run.

    python benchmarks/peer_gpu.py [--only w1,w3,sampled,mt05,mt8b,moe] [--vllm-site /tmp/vllm_site]

Workloads (bf16, ignore_eos, every request's length fixed by its max_tokens):
  w1       qwen2.5-0.5b, 256 requests, prompts 100-1024 tokens, 512 greedy tokens each
  w3       llama-3.1-8b, the same (prompts of another seed)
  sampled  qwen3-1.7b, 512 requests, prompts 64-1536, outputs 64-768, temperature 1, top-p 0.95
  moe      qwen3-30b-a3b (128 experts, top-8), 256 requests, prompts 100-1024, 512 greedy tokens
  mt05     benchmarks/multi_turn.py's workload on qwen2.5-0.5b: 64 sessions x 6 turns, tool latency 0-50 ms, a
           KV pool of 40% of what all sessions need in blocks of 16, token budget 2048. Ours: its sessions
           (KV retained across turns). vLLM: AsyncLLM, each turn a new request carrying the whole history, prefix
           caching on, the same pool (``num_gpu_blocks_override``).
  mt8b     the same on llama-3.1-8b

Each side runs in its own process, one at a time (the GPU to itself): ours with this interpreter, vLLM with
``--vllm-python`` (default: this one) and ``PYTHONPATH=--vllm-site`` (benchmarks/vllm_gpu_setup.sh installs vLLM
0.22.0 there on the GPU machine). The vLLM process imports nothing of this project: it reads its job from a JSON
file and writes tokens counts and seconds to another. vLLM runs as a user would: torch.compile and CUDA graphs on,
``load_format="dummy"``, ``skip_tokenizer_init``; its FlashInfer sampler is off unless FlashInfer is installed.
Each side generates the same warm-up batch before its timed run (batch workloads: 32 prompts of the workload's
lengths with other tokens, 16 tokens each, its sampling; sessions: one short turn); start-up (process start to
ready, warm-up included) is reported apart. On CUDA ours runs with ``update_backup_bytes=0`` (no update runs; vLLM
keeps no rollback copy either). Appends one section to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("peer_gpu")

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {
    "w1": dict(shape="qwen2.5-0.5b", kind="batch", requests=256, prompt=(100, 1024), output=(512, 512),
               temperature=0.0, top_p=1.0, seed=1, max_model_len=2048),
    "w3": dict(shape="llama-3.1-8b", kind="batch", requests=256, prompt=(100, 1024), output=(512, 512),
               temperature=0.0, top_p=1.0, seed=3, max_model_len=2048),
    "sampled": dict(shape="qwen3-1.7b", kind="batch", requests=512, prompt=(64, 1536), output=(64, 768),
                    temperature=1.0, top_p=0.95, seed=5, max_model_len=4096),
    "moe": dict(shape="qwen3-30b-a3b", kind="batch", requests=256, prompt=(100, 1024), output=(512, 512),
                temperature=0.0, top_p=1.0, seed=7, max_model_len=2048),
    "mt05": dict(shape="qwen2.5-0.5b", kind="sessions", sessions=64, turns=6, pool_fraction=0.4, seed=0,
                 max_model_len=4096),
    "mt8b": dict(shape="llama-3.1-8b", kind="sessions", sessions=64, turns=6, pool_fraction=0.4, seed=0,
                 max_model_len=4096),
}
BLOCK_SIZE = 16
MAX_NUM_SEQS = 256
BATCH_TOKENS = {"batch": 8192, "sessions": 2048}   # max_num_batched_tokens, both sides
WARM_REQUESTS, WARM_TOKENS = 32, 16                  # the batch workloads' warm-up (make_job)


# ================================================================================================ vLLM's side
def vllm_worker(job: dict) -> dict:
    """Runs under vLLM's interpreter (imports only vLLM): the job's workload, timed."""
    import vllm
    from vllm import SamplingParams

    t0 = time.perf_counter()
    common = dict(model=job["model"], load_format="dummy", skip_tokenizer_init=True, dtype=job["dtype"],
                  max_model_len=job["max_model_len"], max_num_seqs=MAX_NUM_SEQS, seed=0,
                  max_num_batched_tokens=job["max_num_batched_tokens"],
                  gpu_memory_utilization=job["gpu_memory_utilization"], enable_prefix_caching=True)
    if job["kind"] == "sessions":
        common.update(block_size=job["block_size"], num_gpu_blocks_override=job["num_blocks"])
        return {"version": vllm.__version__, **_vllm_sessions(job, common, t0)}
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    llm = LLM(**common)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    warm = [TokensPrompt(prompt_token_ids=p) for p in job["warm_prompts"]]
    llm.generate(warm, SamplingParams(max_tokens=WARM_TOKENS, temperature=job["temperature"], top_p=job["top_p"],
                                      ignore_eos=True, detokenize=False), use_tqdm=False)
    startup = time.perf_counter() - t0
    params = [SamplingParams(max_tokens=m, temperature=job["temperature"], top_p=job["top_p"], ignore_eos=True,
                             detokenize=False) for m in job["max_tokens"]]
    t1 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t1
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    cached = sum(int(getattr(o, "num_cached_tokens", 0) or 0) for o in outs)
    prompt_tokens = sum(len(p) for p in job["prompts"])
    return {"version": vllm.__version__, "startup_s": startup, "wall_s": wall, "output_tokens": n_out,
            "tok_s": n_out / wall, "cached_prompt_tokens": cached, "prefill_tokens": prompt_tokens - cached,
            "preemptions": _vllm_preemptions()}


def _vllm_preemptions():
    """vLLM's preemption counter from its in-process Prometheus metrics, where this version has them."""
    try:
        from vllm.v1.metrics.reader import get_metrics_snapshot
        return int(sum(m.value for m in get_metrics_snapshot() if m.name == "vllm:num_preemptions"))
    except Exception:   # noqa: BLE001 - a version without the reader: reported as unknown
        return None


def _vllm_sessions(job: dict, common: dict, t0: float) -> dict:
    """The multi-turn sessions through AsyncLLM: each turn a new request with the whole history."""
    import asyncio

    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**common, disable_log_stats=False))
    stats = {"output_tokens": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0}

    async def turn(rid: str, history: list[int], max_tokens: int) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for out in engine.generate({"prompt_token_ids": history}, params, rid):
            final = out
        stats["prompt_tokens"] += len(history)
        stats["cached_prompt_tokens"] += int(getattr(final, "num_cached_tokens", 0) or 0)
        return list(final.outputs[0].token_ids)

    async def session(i: int, plan: dict) -> None:
        history: list[int] = []
        for t, (tokens, max_tokens) in enumerate(plan["turns"]):
            history += tokens
            out = await turn(f"s{i}-t{t}", list(history), max_tokens)
            stats["output_tokens"] += len(out)
            history += out
            if t + 1 < len(plan["turns"]):
                await asyncio.sleep(plan["latencies"][t])

    async def run() -> dict:
        await turn("warm-up", [3 + i for i in range(40)], 8)
        stats.update(output_tokens=0, prompt_tokens=0, cached_prompt_tokens=0)
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        await asyncio.gather(*(session(i, p) for i, p in enumerate(job["plans"])))
        wall = time.perf_counter() - t1
        return {"startup_s": startup, "wall_s": wall, "tok_s": stats["output_tokens"] / wall, **stats,
                "prefill_tokens": stats["prompt_tokens"] - stats["cached_prompt_tokens"],
                "preemptions": _vllm_preemptions()}

    try:
        return asyncio.run(run())
    finally:
        engine.shutdown()


# ================================================================================================ our side
def ours_worker(job: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    t0 = time.perf_counter()
    from engine import EngineConfig, LLMEngine, SamplingParams

    common = dict(model=job["model"], device=job["device"], dtype=job["dtype"], load_format=job["load_format"],
                  max_model_len=job["max_model_len"], max_num_seqs=MAX_NUM_SEQS,
                  max_num_batched_tokens=job["max_num_batched_tokens"], seed=0,
                  # no weight update runs here and vLLM keeps no rollback copy: the KV pool gets that memory
                  # (the default keeps every parameter's bytes free, 61 GB on the 30B MoE shape)
                  **({"update_backup_bytes": 0} if job["device"].startswith("cuda") else {}))
    if job["kind"] == "sessions":
        from benchmarks.multi_turn import SessionPlan, run_policy
        plans = [SessionPlan([(t, m) for t, m in p["turns"]], p["latencies"]) for p in job["plans"]]
        cfg = EngineConfig(**common, block_size=job["block_size"], num_kv_blocks=job["num_blocks"],
                           host_kv_cache_bytes=job["host_bytes"])
        r = run_policy("ours", cfg, plans, job["vocab"])
        return {"startup_s": r["load_s"], "wall_s": r["seconds"], "output_tokens": r["generated"],
                "tok_s": r["tok_s"], "prefill_tokens": r["prefill"], "recomputed_tokens": r["recomputed"],
                "preemptions": r["preemptions"], "offloaded": r["offloaded"], "dropped": r["dropped"],
                "time_split_s": r["time_split_s"]}
    from benchmarks.engine_timing import run_ours
    eng = LLMEngine(EngineConfig(**common))
    eng.generate(job["warm_prompts"], SamplingParams(max_tokens=WARM_TOKENS, temperature=job["temperature"],
                                                     top_p=job["top_p"], ignore_eos=True))
    startup = time.perf_counter() - t0
    params = [SamplingParams(max_tokens=m, temperature=job["temperature"], top_p=job["top_p"], ignore_eos=True)
              for m in job["max_tokens"]]
    timeline = None
    if eng.device.type == "cuda":   # device time by step kind (two CUDA events a step): where the run's time goes
        from benchmarks.step_timeline import StepTimeline
        timeline = StepTimeline(eng.runner)
        timeline.install()
    r = run_ours(eng, job["prompts"], params, warm_up=False)   # warmed above, on other tokens
    by_kind = {}
    if timeline is not None:
        by_kind = timeline.summary()
        timeline.uninstall()
    return {"startup_s": startup, "wall_s": r["wall_s"], "output_tokens": r["output_tokens"], "tok_s": r["tok_s"],
            "cached_prompt_tokens": r["cached_prompt_tokens"], "prefill_tokens": r["prefill_tokens"],
            "preemptions": r["preemptions"],
            "steps": r["steps"], "runner_steps": r["runner_steps"], "steps_ahead": r["steps_ahead"],
            "time_split_s": r["time_split_s"],
            "steps_by_kind": {k: {n: round(v, 4) for n, v in g.items()} for k, g in by_kind.items()}}


# ================================================================================================ orchestration
def make_job(name: str, root: Path, args) -> dict:
    """The workload's model directory (config only: random weights), prompts or session plans, limits."""
    from engine.model_config import ModelConfig
    from engine.tiny_models import make_tiny_model, write_real_shape_config

    w = dict(WORKLOADS[name])
    if args.tiny:   # CPU smoke test of the orchestration: a tiny model, few tokens
        model, load_format = str(make_tiny_model("qwen2", root / "tiny", seed=0, max_position_embeddings=4096,
                                    hidden_size=128, num_attention_heads=2, num_key_value_heads=1)), \
            "safetensors"
        w.update(requests=4, prompt=(5, 30), output=(4, 8), sessions=3, turns=2, max_model_len=128, pool_fraction=1.0)
    else:
        model, load_format = str(write_real_shape_config(w["shape"], root / w["shape"])), "dummy"
    vocab = ModelConfig.from_pretrained(model).vocab_size
    job = dict(name=name, kind=w["kind"], model=model, load_format=load_format, vocab=vocab,
               device=args.device, dtype=args.dtype, max_model_len=w["max_model_len"],
               max_num_batched_tokens=BATCH_TOKENS[w["kind"]], gpu_memory_utilization=0.3 if args.tiny else 0.9)
    rng = random.Random(w["seed"])
    if w["kind"] == "batch":
        job["prompts"] = [[rng.randrange(3, vocab) for _ in range(rng.randint(*w["prompt"]))]
                          for _ in range(w["requests"])]
        job["max_tokens"] = [rng.randint(*w["output"]) for _ in range(w["requests"])]
        # the warm-up batch (both sides, before the clock): the first WARM_REQUESTS prompts' lengths with other
        # tokens (no prefix-cache hit in the timed run), WARM_TOKENS each, the workload's sampling, so kernels that
        # compile per shape or sampling mode do so before the timed run on either side
        job["warm_prompts"] = [[3 + (t + 1) % (vocab - 3) for t in p] for p in job["prompts"][:WARM_REQUESTS]]
        job.update(temperature=w["temperature"], top_p=w["top_p"])
        return job
    import torch

    from benchmarks.multi_turn import kv_tokens_needed, make_workload
    from engine.kv_cache import kv_bytes_per_block
    plans = make_workload(w["sessions"], w["turns"], vocab, w["seed"])
    if args.tiny:
        plans = [type(p)([(t[:20], min(m, 8)) for t, m in p.turns], p.latencies) for p in plans]
    bs = job["block_size"] = 32 if args.tiny else BLOCK_SIZE   # vLLM's CPU attention wants multiples of 32
    need_blocks = -(-kv_tokens_needed(plans) // bs) + len(plans)
    job["num_blocks"] = int(need_blocks * w["pool_fraction"])
    dtype = getattr(torch, args.dtype)
    job["host_bytes"] = need_blocks * kv_bytes_per_block(ModelConfig.from_pretrained(model), bs, dtype)
    job["plans"] = [{"turns": p.turns, "latencies": p.latencies} for p in plans]
    return job


def run_side(side: str, job: dict, tmp: Path, args) -> dict:
    """One side's process on the job; -> its result, or {"error": ...} (the run goes on without it)."""
    inp, out = tmp / f"{job['name']}-{side}-in.json", tmp / f"{job['name']}-{side}-out.json"
    inp.write_text(json.dumps(job))
    env = dict(os.environ)
    python = sys.executable
    if side == "vllm":
        python = args.vllm_python or sys.executable
        if args.vllm_site:
            env["PYTHONPATH"] = args.vllm_site + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    cmd = [python, str(Path(__file__).resolve()), "--worker", side, str(inp), str(out)]
    t0 = time.perf_counter()
    logger.info("%s / %s ...", job["name"], side)
    try:
        proc = subprocess.run(cmd, env=env, timeout=args.side_timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.side_timeout} s"}
    log_path = tmp / f"{job['name']}-{side}.log"
    log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out.exists():
        if args.logs:   # a failed side's whole log
            Path(args.logs).mkdir(parents=True, exist_ok=True)
            (Path(args.logs) / log_path.name).write_text(proc.stdout + proc.stderr)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        logger.error("%s / %s failed (rc %s):\n%s", job["name"], side, proc.returncode, "\n".join(tail))
        return {"error": f"rc {proc.returncode}: {tail[-1] if tail else ''}"[:300]}
    r = json.loads(out.read_text())
    r["process_s"] = time.perf_counter() - t0
    logger.info("%s / %s: %.0f tok/s (start-up %.1f s)", job["name"], side, r["tok_s"], r["startup_s"])
    for kind, g in (r.get("steps_by_kind") or {}).items():
        logger.info("  %s steps: %d, mean rows %.1f, mean tokens %.0f, host launch %.2f ms, device busy %.2f ms, "
                    "device idle %.2f s", kind, g["steps"], g["mean_rows"], g["mean_tokens"], g["host_ms"],
                    g["busy_ms"], g["gap_s"])
    return r


def table(results: dict) -> tuple[str, str]:
    from benchmarks.report import markdown_table
    headers = ["workload", "shape", "ours tok/s", "vLLM tok/s", "ours / vLLM", "ours start-up s", "vLLM start-up s",
               "ours prefill / recomputed / preemptions", "vLLM prefill / preemptions"]
    rows, versions = [], set()
    for name, r in results.items():
        o, v = r["ours"], r["vllm"]
        if "version" in v:
            versions.add(v["version"])
        fig = lambda d, k: d.get(k, "n/a") if "error" not in d else "failed"   # noqa: E731
        ratio = f"{o['tok_s'] / v['tok_s']:.2f}x" if "error" not in o and "error" not in v else "-"
        rows.append([name, WORKLOADS[name]["shape"], fig(o, "tok_s"), fig(v, "tok_s"), ratio,
                     fig(o, "startup_s"), fig(v, "startup_s"),
                     f"{fig(o, 'prefill_tokens')} / {fig(o, 'recomputed_tokens')} / {fig(o, 'preemptions')}",
                     f"{fig(v, 'prefill_tokens')} / {fig(v, 'preemptions')}"])
    errors = [f"- {n} / {side}: {r[side]['error']}" for n, r in results.items() for side in ("ours", "vllm")
              if "error" in r[side]]
    notes = (f"vLLM {', '.join(sorted(versions))} (torch.compile and CUDA graphs on, dummy weights, token-id "
             f"prompts, prefix caching on) and this engine, each in its own process, one at a time, bf16, random "
             f"weights of each shape, the same prompts / session plans, max_num_seqs {MAX_NUM_SEQS}, token budget "
             f"{BATCH_TOKENS['batch']} (batch workloads) and {BATCH_TOKENS['sessions']} (sessions). Sessions: the "
             f"same KV pool in blocks of {BLOCK_SIZE} on both sides (40% of what all sessions need); ours keeps each "
             f"session's KV between turns (host pool for all of them), vLLM gets each turn as a new request with "
             f"the whole history (its prefix cache reuses what is still resident). Start-up: process start to "
             f"ready, warm-up batch included (batch workloads: the same {WARM_REQUESTS} prompts x {WARM_TOKENS} "
             f"tokens on both sides; ours with update_backup_bytes=0, as vLLM keeps no rollback copy). "
             f"Prefill: prompt tokens computed (vLLM: prompt tokens not served from "
             f"its prefix cache).\n\n" + ("Failed:\n" + "\n".join(errors) if errors else ""))
    return markdown_table(headers, rows), notes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="w1,w3,sampled,mt05,mt8b")
    p.add_argument("--sides", default="ours,vllm")
    p.add_argument("--vllm-site", default="/tmp/vllm_site", help="PYTHONPATH entry holding vLLM ('' for none)")
    p.add_argument("--vllm-python", default=None, help="interpreter for vLLM's side (default: this one)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, few tokens, ours only unless "
                   "--vllm-python names a vLLM CPU build")
    p.add_argument("--side-timeout", type=float, default=400.0)
    p.add_argument("--logs", default=None, help="copy the log of each side that failed here")
    p.add_argument("--json", default=None)
    p.add_argument("--no-results", action="store_true")
    p.add_argument("--worker", nargs=3, metavar=("SIDE", "IN", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        side, inp, out = args.worker
        here = Path(__file__).resolve().parent   # this script's folder must not shadow vLLM's imports
        sys.path[:] = [q for q in sys.path if q and Path(q).resolve() != here]
        job = json.loads(Path(inp).read_text())
        result = (vllm_worker if side == "vllm" else ours_worker)(job)
        Path(out).write_text(json.dumps(result))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(ROOT))
    if args.tiny:
        args.device, args.dtype = "cpu", "float32"
    unknown = [n for n in args.only.split(",") if n not in WORKLOADS]
    if unknown:
        p.error(f"--only: unknown workloads {unknown}; choose from {list(WORKLOADS)}")
    sides = args.sides.split(",")
    if not set(sides) <= {"ours", "vllm"}:
        p.error(f"--sides: 'ours' and/or 'vllm', got {args.sides!r}")
    tmp = Path(tempfile.mkdtemp(prefix="peer_gpu-"))
    results = {}

    def stop(signum, frame):   # a time limit (timeout's SIGTERM): report the workloads that finished
        raise TimeoutError(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop)
    try:
        for name in args.only.split(","):
            job = make_job(name, tmp, args)
            results[name] = {}
            for side in ("ours", "vllm"):
                results[name][side] = run_side(side, job, tmp, args) if side in sides else {"error": "not run"}
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    except TimeoutError as e:
        logger.error("stopped (%s): reporting what finished", e)
        for r in results.values():
            for side in ("ours", "vllm"):
                r.setdefault(side, {"error": "stopped by the time limit"})
    tab, notes = table(results)
    print(tab + "\n\n" + notes, flush=True)
    if not args.no_results and not args.tiny:
        from benchmarks.report import append_results
        append_results("peer_gpu: this engine vs vLLM side by side", args.device, tab, notes)
    return 0 if all("error" not in r[s] for r in results.values() for s in sides) else 1


if __name__ == "__main__":
    sys.exit(main())

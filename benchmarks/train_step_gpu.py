"""Where one PPO training step's time goes on the GPU (rollout.ppo_step.train_step, the step benchmarks/rl_step.py
and examples/ppo.py share), on synthetic trajectories of rl_step's size, and how settings move it.

    python benchmarks/train_step_gpu.py [--shape qwen2.5-0.5b] [--trajectories 128] [--prompt 180] [--answer 512]

The trainer as rl_step builds it (transformers model, fp32 master weights, AdamW, autocast bf16), the shape's
random weights with SmolLM2's vocabulary (as rl_step's random shapes). Variants, each timed over ``--steps``
steps after a warm-up: rl_step's settings, microbatches of 64 (128 ran out of an H200's memory: activations of
~1.5 MB a token), a bf16 reference model, fused AdamW, the three together. Then one
step of rl_step's settings under torch.profiler: the kernels that took most device time.
"""
from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if not __package__:
    sys.path[0] = str(ROOT)

import torch  # noqa: E402

from benchmarks.report import append_results, markdown_table  # noqa: E402
from rollout.ppo_step import PPOStepConfig, train_step  # noqa: E402
from rollout.rl import group_advantages  # noqa: E402
from rollout.trajectory import Trajectory  # noqa: E402

logger = logging.getLogger("train_step_gpu")
SMOLLM2_VOCAB = 49152


def make_model_dir(shape: str, root: Path) -> Path:
    from engine.tiny_models import REAL_SHAPES, make_tiny_model
    config_name, fields = REAL_SHAPES[shape]
    arch = {"Qwen2Config": "qwen2", "LlamaConfig": "llama"}[config_name]
    fields = {**fields, "vocab_size": SMOLLM2_VOCAB, "bos_token_id": 1, "eos_token_id": 2,
              "head_dim": fields["hidden_size"] // fields["num_attention_heads"], "initializer_range": 0.02}
    return make_tiny_model(arch, root / shape, seed=0, **fields)


def synthetic(n: int, prompt: int, answer: int, seed: int) -> list[Trajectory]:
    """Prompts of prompt +- 10% tokens, answers of ``answer`` model tokens (a random model never stops early)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.randint(int(prompt * 0.9), int(prompt * 1.1))
        out.append(Trajectory(prompt_ids=[rng.randrange(3, SMOLLM2_VOCAB) for _ in range(p)],
                              token_ids=[rng.randrange(3, SMOLLM2_VOCAB) for _ in range(answer)],
                              logprobs=[-10.8] * answer, loss_mask=[1] * answer, versions=[0] * answer,
                              reward=float(rng.random() < 0.5)))
    return out


def build(model_dir: Path, dev: torch.device, ref_dtype: torch.dtype, fused: bool):
    from transformers import AutoModelForCausalLM
    policy = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(dev)
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=ref_dtype).to(dev).eval()
    reference.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5, weight_decay=0.0, fused=fused)
    return policy, reference, opt


def time_variant(name: str, model_dir: Path, dev: torch.device, trajs, advantages, steps: int, *, minibatch: int,
                 ref_dtype: torch.dtype = torch.float32, fused: bool = False) -> dict:
    policy, reference, opt = build(model_dir, dev, ref_dtype, fused)
    cfg = PPOStepConfig(epochs=2, minibatch=minibatch, kl_coef=0.02, autocast_dtype="bfloat16")
    times = []
    for i in range(steps + 1):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        train_step(policy, reference, opt, None, trajs, advantages, cfg, 0, dev, 0)
        torch.cuda.synchronize(dev)
        if i:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev)
    del policy, reference, opt
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    r = {"variant": name, "seconds": statistics.median(times), "peak_gb": peak / 1e9}
    logger.info("%s", r)
    return r


def profile_step(model_dir: Path, dev: torch.device, trajs, advantages, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile
    policy, reference, opt = build(model_dir, dev, torch.float32, False)
    cfg = PPOStepConfig(epochs=2, minibatch=32, kl_coef=0.02, autocast_dtype="bfloat16")
    train_step(policy, reference, opt, None, trajs, advantages, cfg, 0, dev, 0)       # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_step(policy, reference, opt, None, trajs, advantages, cfg, 0, dev, 0)
        torch.cuda.synchronize(dev)
    logger.info("attention implementation: %s", getattr(policy.config, "_attn_implementation", "?"))
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=70)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b")
    p.add_argument("--trajectories", type=int, default=128)
    p.add_argument("--prompt", type=int, default=180)
    p.add_argument("--answer", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("train_step_gpu needs CUDA")
    dev = torch.device("cuda", torch.cuda.current_device())
    trajs = synthetic(args.trajectories, args.prompt, args.answer, seed=0)
    advantages = group_advantages([t.reward for t in trajs], 8)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(args.shape, Path(tmp))
        variants = [("rl_step's: microbatch 32, fp32 reference", dict(minibatch=32)),
                    ("microbatch 64", dict(minibatch=64)),
                    ("microbatch 64, bf16 reference, fused AdamW", dict(minibatch=64, ref_dtype=torch.bfloat16,
                                                                        fused=True)),
                    ("bf16 reference", dict(minibatch=32, ref_dtype=torch.bfloat16)),
                    ("fused AdamW", dict(minibatch=32, fused=True))]
        results = [time_variant(name, model_dir, dev, trajs, advantages, args.steps, **kw) for name, kw in variants]
        prof = profile_step(model_dir, dev, trajs, advantages, args.top)
    print(prof)
    base = results[0]["seconds"]
    rows = [[r["variant"], f"{r['seconds']:.3f}", f"{r['seconds'] / base:.2f}x", f"{r['peak_gb']:.1f}"]
            for r in results]
    table = markdown_table(["variant", "train step s", "/ rl_step's", "peak GB"], rows)
    print(table)
    if not args.no_append:
        append_results(f"PPO train step on the GPU ({args.shape}, random weights, SmolLM2 vocab)", str(dev), table,
                       notes=f"`benchmarks/train_step_gpu.py`: rollout.ppo_step.train_step on {args.trajectories} "
                             f"synthetic trajectories (prompts ~{args.prompt}, answers {args.answer} model tokens), "
                             f"2 epochs, autocast bf16, fp32 policy + AdamW; medians of {args.steps} steps after a "
                             f"warm-up.\n\nTop kernels of one step (torch.profiler):\n\n```\n{prof}\n```")
    return results


if __name__ == "__main__":
    main()

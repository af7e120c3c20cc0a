"""PPO (GRPO-style advantages) on SmolLM2-135M-Instruct with live weight sync and multi-turn tool rollouts.

    python examples/ppo.py                      # CPU, the defaults below (about 9 minutes on 2 cores)
    python examples/ppo.py --device cuda        # one GPU: trainer + colocated bf16 engine, CUDA IPC, sleep/wake
    python examples/ppo.py --async 1 --tis-cap 2   # step k+1's rollouts run while step k trains

On one GPU (``--device cuda``): the trainer (fp32 weights and AdamW) and one rollout worker share the GPU (the
worker's Ray bundle takes half of it, ``num_gpus_per_worker=0.5``; the engine's KV budget is
``--gpu-memory-utilization`` of the device minus what is in use when it starts, the trainer's weights included).
The engine runs in bf16 (``--engine-dtype``); ``--fp32-lm-head`` has it compute the final norm, lm_head and
logprobs in fp32, the usual fix for the bf16 train/inference mismatch, which each step logs at its first epoch
(mean and max |pi_trainer / pi_engine - 1|); ``--true-on-policy`` removes it: the engine runs in batch-invariant
mode and the trainer's logprobs come from the same kernels (engine.models.invariant_policy), so the first epoch's
ratio is exactly 1. In synchronous mode the engine sleeps while the trainer trains
(``--sleep-level`` 1: the KV cache goes back to the device; 2: the weights too) and wakes before the push.

Each step:
  1. rollouts: a RolloutPool (Ray actors hosting engines) runs the calculator tool environment server-side
     for ``questions x group_size`` episodes: the model may call ``<calc>EXPR</calc>``, reads the result as
     an observation (loss mask 0), answers; reward 1 for the right number (+ credit for a well-formed call,
     see rollout/envs/calculator.py). Trajectories come back through Ray object refs, in completion order.
     With ``--async N`` the episodes of step k+N are submitted before step k trains, so they run under
     version k weights (and k+1.. once updates land mid-episode): every model token is then at most N
     versions stale, which the example checks on each trajectory's per-token versions and fails on if not.
  2. advantages: group-relative (GRPO): reward minus the mean of the episodes of the same question, over
     their std. No value head.
  3. PPO: ``--epochs`` passes of the clipped surrogate on the engine's behaviour logprobs plus a k3 KL
     penalty to the frozen reference policy, token-mean over model tokens; one AdamW step per epoch,
     the learning rate warmed up linearly over the first ``--lr-warmup`` optimizer steps. At the first
     epoch the importance ratio trainer/engine is printed: it must be 1 (within 1e-3 on average) — the
     train/inference mismatch check, on the tokens sampled by the trainer's current version.
     ``--tis-cap C`` (needed with ``--async``): the ratio is taken against the trainer's own logprobs at
     the step's start (the first epoch's forward, before any update) and each token's surrogate is
     multiplied by min(pi_old / pi_behaviour, C), the truncated importance weight for stale tokens
     (rollout.rl.ppo_loss).
  4. weight sync (rollout.weight_push.WeightPusher): the trainer's parameters (Hugging Face names, in the
     engine's dtype) go to every worker: through CUDA IPC when the worker shares the trainer's GPU (the trainer
     packs them into its persistent buffers, the engine copies device to device), else through the Ray object
     store in buckets; validated and applied atomically on every worker; version += 1. In-flight
     turns continue under the new weights with their KV recomputed, so a token's version names the weights
     its whole context was computed with (in synchronous mode nothing is in flight at that point).

Why the warm-up: Adam's first step is sign-like (bias-corrected m/sqrt(v) = g/|g|, so every weight moves by
about lr whatever the gradient's size, and gradient clipping cannot shrink it). Without warm-up, step 0's
update was 1.5x the later ones (parameter update norm 0.456 vs 0.299, 0.264, 0.236 for seed 0) and clipped
a third of the tokens at its second epoch (vs 18%, 9%, 3%); with two warm-up steps it was 0.372 vs 0.368,
0.282, 0.248 (README: all seeds).

KL in the log and the plot is the k3 estimate at the first epoch, on the step's own samples: there (in
synchronous mode) the sampling policy is the one evaluated, so the estimate is unbiased for
KL(policy || reference); with ``--async`` the samples are up to N versions old. At later
epochs the same tokens are off-policy for the updated weights and k3 = r - 1 - log r (r = pi_ref / pi) is
heavy-tailed (a single token whose probability an update cut can add hundreds); those values are in
``kl_epochs`` for diagnosis, not in the headline figure.

Writes ``<out>/metrics.json`` and ``<out>/ppo.png`` (reward and KL per step).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from engine import EngineConfig, SamplingParams  # noqa: E402
from rollout.ppo_step import PPOStepConfig, train_step  # noqa: E402
from rollout.rl import group_advantages, staleness  # noqa: E402
from rollout.trajectory import Trajectory  # noqa: E402

logger = logging.getLogger("ppo")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: one GPU shared by the trainer and the worker")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--questions", type=int, default=None, help="questions per step (default 4 on CPU, 8 on CUDA)")
    p.add_argument("--group-size", type=int, default=None,
                   help="episodes per question, the GRPO group (default 4 on CPU, 8 on CUDA)")
    p.add_argument("--engine-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="the rollout engine's dtype (default float32 on CPU, bfloat16 on CUDA); the trainer is fp32")
    p.add_argument("--fp32-lm-head", action="store_true",
                   help="the engine computes the final norm, lm_head and logprobs in fp32")
    p.add_argument("--true-on-policy", action="store_true",
                   help="the engine in batch-invariant mode and the trainer's logprobs from the same kernels "
                        "(engine.models.invariant_policy): the first epoch's |ratio - 1| is exactly 0")
    p.add_argument("--routing-replay", action="store_true",
                   help="MoE models: the rollouts return their routed experts and the trainer's forwards replay them "
                        "(rollout.routing_replay)")
    p.add_argument("--sleep-level", type=int, default=None, choices=[0, 1, 2],
                   help="synchronous mode: the engine sleeps while the trainer trains (1: KV cache, 2: weights "
                        "too; 0: never; default 1 on CUDA, 0 on CPU)")
    p.add_argument("--trainer-autocast", default="none", choices=["none", "bfloat16", "float16"],
                   help="the trainer's mixed precision for forward/backward (fp32 master weights and optimizer)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3,
                   help="CUDA: the engine's share of the device (everything in use at its start counts)")
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--difficulty", default="easy", choices=["easy", "hard"])
    p.add_argument("--max-tokens", type=int, default=48, help="per model turn")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--lr-warmup", type=int, default=2,
                   help="optimizer steps of linear learning-rate warm-up (0 = none); see above for why")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--minibatch", type=int, default=8)
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--kl-coef", type=float, default=0.02)
    p.add_argument("--tis-cap", type=float, default=0.0,
                   help="truncated importance sampling: cap C of the weight pi_old / pi_behaviour (0 = off)")
    p.add_argument("--async", dest="async_lag", type=int, default=0, metavar="N",
                   help="submit the rollouts of step k+N before step k trains (0 = synchronous); "
                        "model tokens are then at most N versions stale")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/ppo")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.lr_warmup < 0:
        p.error(f"--lr-warmup must be >= 0, got {args.lr_warmup}")
    if not args.tis_cap >= 0:
        p.error(f"--tis-cap must be >= 0 (0 = off), got {args.tis_cap}")
    if args.async_lag < 0:
        p.error(f"--async must be >= 0, got {args.async_lag}")
    cuda = args.device.startswith("cuda")
    args.questions = args.questions if args.questions is not None else (8 if cuda else 4)
    args.group_size = args.group_size if args.group_size is not None else (8 if cuda else 4)
    args.engine_dtype = args.engine_dtype or ("bfloat16" if cuda else "float32")
    if args.sleep_level is None:
        args.sleep_level = 1 if cuda and args.async_lag == 0 else 0
    if args.sleep_level and args.async_lag:
        p.error("--sleep-level needs synchronous mode: with --async the engine runs rollouts while the trainer trains")
    if not 0 < args.gpu_memory_utilization < 1:
        p.error(f"--gpu-memory-utilization must be in (0, 1), got {args.gpu_memory_utilization}")
    if args.true_on_policy and args.trainer_autocast != "none":
        p.error("--true-on-policy computes the trainer's forward in the engine's dtype itself: leave "
                "--trainer-autocast at none")
    if args.async_lag > 0 and args.tis_cap == 0:
        p.error("--async N trains on tokens sampled up to N versions ago: pass --tis-cap C (e.g. 2) so the loss "
                "corrects for it")
    return args


def plot(metrics: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(steps, [m["reward_mean"] for m in metrics], "o-", color="tab:blue", label="reward (mean)")
    ax1.set_xlabel("PPO step")
    ax1.set_ylabel("reward", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(steps, [m["kl"] for m in metrics], "s--", color="tab:red", label="KL to reference")
    ax2.set_ylabel("KL", color="tab:red")
    fig.suptitle("PPO on SmolLM2-135M-Instruct, calculator tool environment")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class Rollouts:
    """One step's episodes, submitted to the pool and not yet collected."""
    step: int
    refs: list[Any]            # Ray ObjectRefs, one per episode, each resolving to a Trajectory
    submitted_at: float        # time.perf_counter() at submission
    engine_version: int        # the pool's weight version at submission


class RolloutQueue:
    """Steps' episodes submitted ahead of their training, in step order. ``fill(n)`` keeps the next ``n``
    steps in flight: after step k's episodes are collected, ``fill(N)`` submits step k+N's under the engine's
    version k, and step k+N trains at version k+N, so none of its tokens is more than N versions stale."""

    def __init__(self, pool: Any, args: argparse.Namespace, params: SamplingParams) -> None:
        self.pool, self.args, self.params = pool, args, params
        self.rng = random.Random(args.seed)   # questions drawn in step order: a seed asks the same ones
        self.next_step = 0
        self.in_flight: deque[Rollouts] = deque()

    def fill(self, n: int) -> None:
        while len(self.in_flight) < n and self.next_step < self.args.steps:
            questions = [self.rng.randrange(1 << 30) for _ in range(self.args.questions)]
            env_kwargs = [{"seed": q, "difficulty": self.args.difficulty, "few_shot": True}
                          for q in questions for _ in range(self.args.group_size)]
            refs = self.pool.run_episodes_refs("calculator", env_kwargs, self.params, self.args.max_turns)
            self.in_flight.append(Rollouts(self.next_step, refs, time.perf_counter(), self.pool.version))
            self.next_step += 1

    def collect(self, step: int) -> tuple[Rollouts, list[Trajectory]]:
        """Step ``step``'s trajectories (in episode order; gathered in completion order)."""
        self.fill(1)
        rollouts = self.in_flight.popleft()
        assert rollouts.step == step, (rollouts.step, step)
        trajs: list[Any] = [None] * len(rollouts.refs)
        for i, traj in self.pool.as_completed(rollouts.refs):
            trajs[i] = traj
        return rollouts, trajs


def train_loop(args: argparse.Namespace, pool, pusher, policy, reference, optimizer, scheduler, pad_id: int,
               device: torch.device) -> list[dict]:
    """``args.steps`` PPO steps (rollouts, advantages, epochs, weight push); one metrics dict per step."""
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            return_routed_experts=args.routing_replay)
    step_cfg = PPOStepConfig(epochs=args.epochs, minibatch=args.minibatch, clip=args.clip, kl_coef=args.kl_coef,
                             tis_cap=args.tis_cap, temperature=args.temperature,
                             autocast_dtype=None if args.trainer_autocast == "none" else args.trainer_autocast)
    version = 0
    metrics: list[dict] = []
    queue = RolloutQueue(pool, args, params)
    progress = tqdm(range(args.steps), desc="PPO", unit="step")
    for step in progress:
        # ---- 1. rollouts (server-side agent loop): this step's (submitted a step ahead with --async), then the
        # next --async steps' episodes go out so they run while this step trains
        t0 = time.perf_counter()
        rollouts, trajs = queue.collect(step)
        rollout_wait_s = time.perf_counter() - t0
        rollout_s = time.perf_counter() - rollouts.submitted_at    # with --async: overlaps the training
        queue.fill(args.async_lag)
        rewards = [t.reward or 0.0 for t in trajs]
        num_model_tokens = sum(t.num_model_tokens for t in trajs)
        env_tokens = sum(len(t.loss_mask) - t.num_model_tokens for t in trajs)
        stale = staleness(torch.tensor([v for t in trajs for v in t.versions], dtype=torch.long),
                          torch.tensor([m for t in trajs for m in t.loss_mask], dtype=torch.long), version)
        if stale.max > args.async_lag:
            raise RuntimeError(f"step {step}: a model token was sampled {stale.max} versions before the trainer's "
                               f"{version}, more than --async {args.async_lag} allows (submitted at engine version "
                               f"{rollouts.engine_version})")

        # ---- 2. advantages, 3. PPO epochs
        advantages = group_advantages(rewards, args.group_size)
        t_sleep = time.perf_counter()
        freed = sum(r["freed_bytes"] for r in asyncio.run(pool.sleep(args.sleep_level))) if args.sleep_level else 0
        t1 = time.perf_counter()
        stats = train_step(policy, reference, optimizer, scheduler, trajs, advantages, step_cfg, pad_id, device,
                           version)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - t1
        if args.sleep_level:
            if device.type == "cuda":
                torch.cuda.empty_cache()       # the trainer's cached activations go back: the engine takes its KV
            asyncio.run(pool.wake_up())
        sleep_wake_s = time.perf_counter() - t_sleep - train_s

        # ---- 4. push the new weights to every engine (CUDA IPC or the object store, one version barrier);
        # in-flight turns (--async) continue under them with their KV recomputed
        version += 1
        push = pusher.push(policy.named_parameters(), version, mode="keep", kv="recompute")
        sync_ms = push.seconds * 1000

        m = dict(step=step, version=version, reward_mean=sum(rewards) / len(rewards),
                 reward_max=max(rewards), **asdict(stats),
                 tool_calls=sum(1 for t in trajs if t.turns > 1), episodes=len(trajs),
                 model_tokens=num_model_tokens, env_tokens=env_tokens,
                 rollout_tok_s=num_model_tokens / rollout_s, rollout_s=rollout_s, rollout_wait_s=rollout_wait_s,
                 train_s=train_s, weight_sync_ms=sync_ms, weight_sync_transport=push.transport,
                 weight_sync_bytes=push.bytes, sleep_wake_s=sleep_wake_s, sleep_freed_bytes=freed,
                 staleness=stale.max, staleness_mean=stale.mean,
                 engine_version_at_submit=rollouts.engine_version)
        metrics.append(m)
        dev, dev_max = stats.first_epoch_ratio_abs_dev, stats.first_epoch_ratio_max_dev
        logger.info("step %d: reward %.3f (max %.2f) | KL %.4f | policy loss %.4f | clip %.3f | |ratio-1| mean %s "
                    "max %s at epoch 0 (%d fresh tokens) | %d/%d episodes used the tool | staleness max %d mean %.2f "
                    "| version %d", step, m["reward_mean"], m["reward_max"], m["kl"], m["policy_loss"], m["clip_frac"],
                    "n/a" if dev is None else f"{dev:.2e}", "n/a" if dev_max is None else f"{dev_max:.2e}",
                    stats.mismatch_tokens, m["tool_calls"], m["episodes"], stale.max, stale.mean, version)
        logger.info("step %d phases: rollout %.2f s (%.0f tok/s, waited %.2f s) | sleep+wake %.2f s (%.2f GB freed) | "
                    "train %.2f s | weight sync %.1f ms (%s, %.0f MB)", step, rollout_s, m["rollout_tok_s"],
                    rollout_wait_s, sleep_wake_s, freed / 1e9, train_s, sync_ms, push.transport, push.bytes / 1e6)
        logger.info("step %d: per epoch KL %s clip %s | grad norm %s | lr %s | update norm %.4f | TIS weight mean "
                    "%.3f, capped %.3f", step, [round(x, 4) for x in stats.kl_epochs],
                    [round(x, 3) for x in stats.clip_frac_epochs], [round(x, 2) for x in stats.grad_norms],
                    [f"{x:.1e}" for x in stats.lrs], stats.update_norm, stats.tis_weight_mean, stats.tis_capped_frac)
        progress.set_postfix(reward=f"{m['reward_mean']:.2f}", kl=f"{m['kl']:.3f}")

    return metrics


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("engine", "rollout", "ray", "weight_sync"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import ray
    from transformers import AutoModelForCausalLM

    from engine.llm_engine import resolve_model_path
    from rollout.pool import RolloutPool

    model_dir = resolve_model_path(args.model)
    device = torch.device(args.device)
    if args.routing_replay:
        from engine.model_config import ModelConfig
        if not ModelConfig.from_pretrained(model_dir).is_moe:
            raise SystemExit(f"--routing-replay: {args.model} has no mixture-of-experts layers")
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    if args.true_on_policy:
        # the same parameters (HF names, fp32 master weights: optimizer and weight push see no difference), its
        # forward over the engine's batch-invariant kernels in the engine's dtype
        from engine.models.invariant_policy import InvariantPolicy
        policy = InvariantPolicy(policy, compute_dtype=getattr(torch, args.engine_dtype),
                                 fp32_lm_head=args.fp32_lm_head, block_size=16)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    reference.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    # linear warm-up: optimizer step t (0-based) runs at lr * (t + 1) / lr_warmup until it reaches lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 1.0 if args.lr_warmup == 0 else min(1.0, (t + 1) / args.lr_warmup))
    pad_id = policy.config.pad_token_id if policy.config.pad_token_id is not None else 0

    from rollout.weight_push import WeightPusher
    cuda = device.type == "cuda"
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(2, args.workers + 1), num_gpus=1 if cuda else 0, include_dashboard=False,
                 log_to_driver=False)
    engine_config = EngineConfig(model=str(model_dir), device=args.device, dtype=args.engine_dtype,
                                 max_num_seqs=max(64, args.questions * args.group_size), seed=args.seed,
                                 gpu_memory_utilization=args.gpu_memory_utilization,
                                 batch_invariant=args.true_on_policy,
                                 **({"fp32_lm_head": True} if args.fp32_lm_head else {}))
    # CUDA: every worker shares the trainer's GPU (its bundle takes a fraction), so weights go through CUDA IPC
    pool = RolloutPool(engine_config, num_workers=args.workers,
                       num_gpus_per_worker=1.0 / (args.workers + 1) if cuda else None)
    pusher = WeightPusher(pool, device=device)
    try:
        metrics = train_loop(args, pool, pusher, policy, reference, optimizer, scheduler, pad_id, device)
    finally:
        pusher.close()
        pool.close()
        ray.shutdown()
    first = sum(m["reward_mean"] for m in metrics[:3]) / min(3, len(metrics))
    last = sum(m["reward_mean"] for m in metrics[-3:]) / min(3, len(metrics))
    max_staleness = max(m["staleness"] for m in metrics)
    devs = [m["first_epoch_ratio_abs_dev"] for m in metrics if m["first_epoch_ratio_abs_dev"] is not None]
    maxes = [m["first_epoch_ratio_max_dev"] for m in metrics if m["first_epoch_ratio_max_dev"] is not None]
    phases = {k: sum(m[k] for m in metrics) / len(metrics) for k in ("rollout_s", "sleep_wake_s", "train_s")}
    phases["weight_sync_ms"] = sum(m["weight_sync_ms"] for m in metrics) / len(metrics)
    summary = dict(args=vars(args), steps=metrics, reward_first3=first, reward_last3=last, improvement=last - first,
                   final_version=metrics[-1]["version"], max_staleness=max_staleness,
                   mismatch_mean=sum(devs) / len(devs) if devs else None, mismatch_max=max(maxes) if maxes else None,
                   mean_phase_times=phases, weight_sync_transport=metrics[-1]["weight_sync_transport"],
                   device_name=torch.cuda.get_device_name(device) if cuda else "cpu", pool_stats=None)
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    plot(metrics, out / "ppo.png")
    print(f"\nmean reward: first 3 steps {first:.3f} -> last 3 steps {last:.3f} ({last - first:+.3f}); "
          f"weight version {metrics[-1]['version']}; max staleness {max_staleness}; train/inference |ratio - 1| at "
          f"the first epoch: mean {summary['mismatch_mean']}, max {summary['mismatch_max']}; mean phase times "
          + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
          + f"; wrote {out / 'metrics.json'} and {out / 'ppo.png'}")
    return summary


if __name__ == "__main__":
    main()

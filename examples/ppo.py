"""PPO (GRPO-style advantages) on SmolLM2-135M-Instruct with live weight sync and multi-turn tool rollouts.

    python examples/ppo.py                      # CPU, the defaults below (about 6 minutes on 2 cores)
    python examples/ppo.py --device cuda --questions 32 --group-size 8

Each step:
  1. rollouts: a RolloutPool (Ray actors hosting engines) runs the calculator tool environment server-side
     for ``questions x group_size`` episodes: the model may call ``<calc>EXPR</calc>``, reads the result as
     an observation (loss mask 0), answers; reward 1 for the right number (+ credit for a well-formed call,
     see rollout/envs/calculator.py). Trajectories come back through Ray object refs, in completion order.
  2. advantages: group-relative (GRPO): reward minus the mean of the episodes of the same question, over
     their std. No value head.
  3. PPO: ``--epochs`` passes of the clipped surrogate on the engine's behaviour logprobs plus a k3 KL
     penalty to the frozen reference policy, token-mean over model tokens. At the first epoch the
     importance ratio trainer/engine is printed: it must be 1 (within 1e-3 on average) — the
     train/inference mismatch check.
  4. weight sync: the trainer's state dict (Hugging Face names) goes to every worker through the Ray object
     store in buckets (weight_sync.RayObjectLoader), validated and applied atomically; version += 1.

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from engine import EngineConfig, SamplingParams  # noqa: E402
from rollout.rl import group_advantages, make_batch, ppo_loss, token_logprobs  # noqa: E402

logger = logging.getLogger("ppo")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--questions", type=int, default=4, help="questions per step")
    p.add_argument("--group-size", type=int, default=4, help="episodes per question (GRPO group)")
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--difficulty", default="easy", choices=["easy", "hard"])
    p.add_argument("--max-tokens", type=int, default=48, help="per model turn")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--minibatch", type=int, default=8)
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--kl-coef", type=float, default=0.02)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/ppo")
    return p.parse_args(argv)


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
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    reference.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    pad_id = policy.config.pad_token_id if policy.config.pad_token_id is not None else 0

    if not ray.is_initialized():
        ray.init(num_cpus=max(2, args.workers + 1), include_dashboard=False, log_to_driver=False)
    engine_config = EngineConfig(model=str(model_dir), device=args.device, dtype="float32",
                                 max_num_seqs=max(64, args.questions * args.group_size), seed=args.seed)
    pool = RolloutPool(engine_config, num_workers=args.workers)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    version = 0
    metrics: list[dict] = []
    rng = random.Random(args.seed)
    progress = tqdm(range(args.steps), desc="PPO", unit="step")
    for step in progress:
        # ---- 1. rollouts (server-side agent loop), consumed in completion order
        t0 = time.perf_counter()
        questions = [rng.randrange(1 << 30) for _ in range(args.questions)]
        env_kwargs = [{"seed": q, "difficulty": args.difficulty, "few_shot": True}
                      for q in questions for _ in range(args.group_size)]
        refs = pool.run_episodes_refs("calculator", env_kwargs, params, args.max_turns)
        trajs = [None] * len(refs)
        for i, traj in pool.as_completed(refs):
            trajs[i] = traj
        rollout_s = time.perf_counter() - t0
        rewards = [t.reward or 0.0 for t in trajs]
        num_model_tokens = sum(t.num_model_tokens for t in trajs)
        env_tokens = sum(len(t.loss_mask) - t.num_model_tokens for t in trajs)
        staleness = max((version - v for t in trajs for v, m in zip(t.versions, t.loss_mask) if m), default=0)

        # ---- 2. advantages, 3. PPO epochs: one optimizer step per epoch (gradients accumulated over
        # microbatches), so every ratio of the first epoch is measured before any update of this step
        advantages = group_advantages(rewards, args.group_size)
        policy.train()
        stats = {"policy_loss": [], "kl": [], "clip_frac": [], "ratio_dev": []}
        first_epoch_ratio_dev = []
        t1 = time.perf_counter()
        num_tokens = max(1, num_model_tokens)
        micro = [list(range(i, min(i + args.minibatch, len(trajs)))) for i in range(0, len(trajs), args.minibatch)]
        batches = [make_batch([trajs[i] for i in idx], [advantages[i] for i in idx], pad_id) for idx in micro]
        batches = [type(b)(*(x.to(device) for x in vars(b).values())) for b in batches]
        with torch.no_grad():
            ref_lps = [token_logprobs(reference, b, args.temperature) for b in batches]
        for epoch in range(args.epochs):
            optimizer.zero_grad(set_to_none=True)
            for batch, ref_lp in zip(batches, ref_lps):
                new_lp = token_logprobs(policy, batch, args.temperature)
                res = ppo_loss(new_lp, batch, ref_lp, args.clip, args.kl_coef)
                weight = batch.loss_mask.sum().item() / num_tokens     # token-mean over the whole step
                (res.loss * weight).backward()
                if epoch == 0:
                    first_epoch_ratio_dev.append((res.ratio_abs_dev, weight))
                for k, v in (("policy_loss", res.policy_loss), ("kl", res.kl), ("clip_frac", res.clip_frac),
                             ("ratio_dev", res.ratio_abs_dev)):
                    stats[k].append(v)
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
        train_s = time.perf_counter() - t1

        # ---- 4. push the new weights to every engine (Ray object store, one version barrier)
        t2 = time.perf_counter()
        version += 1
        state = {n: p.detach().to("cpu") for n, p in policy.state_dict().items()}
        asyncio.run(pool.update_weights_from_state_dict(state, version=version))
        sync_ms = (time.perf_counter() - t2) * 1000

        m = dict(step=step, version=version, reward_mean=sum(rewards) / len(rewards),
                 reward_max=max(rewards), kl=sum(stats["kl"]) / len(stats["kl"]),
                 policy_loss=sum(stats["policy_loss"]) / len(stats["policy_loss"]),
                 clip_frac=sum(stats["clip_frac"]) / len(stats["clip_frac"]),
                 first_epoch_ratio_abs_dev=sum(d * w for d, w in first_epoch_ratio_dev),
                 tool_calls=sum(1 for t in trajs if t.turns > 1), episodes=len(trajs),
                 model_tokens=num_model_tokens, env_tokens=env_tokens,
                 rollout_tok_s=num_model_tokens / rollout_s, rollout_s=rollout_s, train_s=train_s,
                 weight_sync_ms=sync_ms, staleness=staleness)
        metrics.append(m)
        logger.info("step %d: reward %.3f (max %.2f) | KL %.4f | policy loss %.4f | clip %.3f | |ratio-1| %.2e "
                    "at epoch 0 | %d/%d episodes used the tool | rollout %.0f tok/s | weight sync %.0f ms | "
                    "staleness %d | version %d", step, m["reward_mean"], m["reward_max"], m["kl"], m["policy_loss"],
                    m["clip_frac"], m["first_epoch_ratio_abs_dev"], m["tool_calls"], m["episodes"],
                    m["rollout_tok_s"], sync_ms, staleness, version)
        progress.set_postfix(reward=f"{m['reward_mean']:.2f}", kl=f"{m['kl']:.3f}")

    first = sum(m["reward_mean"] for m in metrics[:3]) / min(3, len(metrics))
    last = sum(m["reward_mean"] for m in metrics[-3:]) / min(3, len(metrics))
    summary = dict(args=vars(args), steps=metrics, reward_first3=first, reward_last3=last,
                   improvement=last - first, final_version=version, pool_stats=None)
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    plot(metrics, out / "ppo.png")
    print(f"\nmean reward: first 3 steps {first:.3f} -> last 3 steps {last:.3f} ({last - first:+.3f}); "
          f"weight version {version}; wrote {out / 'metrics.json'} and {out / 'ppo.png'}")
    pool.close()
    ray.shutdown()
    return summary


if __name__ == "__main__":
    main()

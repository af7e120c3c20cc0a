"""Multi-turn tool agent: SmolLM2-135M-Instruct solves arithmetic with the calculator environment, the agent
loop running server-side (``run_episode``).

    python examples/multi_turn_agent.py                  # a RolloutPool of 1 CPU worker (local Ray)
    python examples/multi_turn_agent.py --local          # one engine in this process (LocalBackend)
    python examples/multi_turn_agent.py --episodes 4 --temperature 0.7 --no-color

Prints each episode's transcript with model tokens (loss mask 1) in green, or between [[ ]] with --no-color,
and environment tokens (prompt, tool results; loss mask 0) plain; then the reward and which policy version
sampled the model tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import EngineConfig, SamplingParams  # noqa: E402
from rollout.trajectory import Trajectory  # noqa: E402

GREEN, RESET = "\033[32m", "\033[0m"


def render(traj: Trajectory, tokenizer, color: bool) -> str:
    """The transcript, one run of equal loss mask at a time (decoding runs, not single tokens, keeps
    multi-token characters intact)."""
    ids = traj.prompt_ids + traj.token_ids
    mask = [0] * len(traj.prompt_ids) + traj.loss_mask
    out = []
    for is_model, run in itertools.groupby(zip(ids, mask), key=lambda p: p[1]):
        text = tokenizer.decode([t for t, _ in run])
        if is_model:
            text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
        out.append(text)
    return "".join(out)


def versions_summary(traj: Trajectory) -> str:
    counts = Counter(v for v, m in zip(traj.versions, traj.loss_mask) if m)
    return ", ".join(f"v{v}: {n} tokens" for v, n in sorted(counts.items())) or "no model tokens"


async def main(args: argparse.Namespace) -> int:
    config = EngineConfig(model="smollm2", max_num_seqs=16)
    if args.local:
        from rollout.local import LocalBackend
        backend = LocalBackend(config)
        tokenizer = backend.loop.tokenizer()
    else:
        import ray

        from rollout.pool import RolloutPool
        repo = str(Path(__file__).resolve().parents[1])
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": repo}})
        backend = RolloutPool(config, 1, num_cpus_per_worker=1.0)
        from transformers import AutoTokenizer

        from engine.llm_engine import resolve_model_path
        tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path("smollm2")))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                            stop_token_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")])
    try:
        start = time.perf_counter()
        episodes = await asyncio.gather(*(
            backend.run_episode("calculator", {"seed": args.seed + i}, params, args.max_turns)
            for i in range(args.episodes)))
        elapsed = time.perf_counter() - start
        for i, traj in enumerate(episodes):
            print(f"===== episode {i}: reward {traj.reward}, {traj.turns} turns, finish_reason {traj.finish_reason}, "
                  f"{traj.num_model_tokens} model / {len(traj.token_ids) - traj.num_model_tokens} env tokens, "
                  f"worker {traj.metrics.get('worker', 0)}")
            print(render(traj, tokenizer, color=not args.no_color))
            print(f"----- versions: {versions_summary(traj)}\n")
        mean = sum(t.reward or 0.0 for t in episodes) / len(episodes)
        print(f"{len(episodes)} episodes in {elapsed:.1f} s, mean reward {mean:.2f}")
    finally:
        await backend.shutdown()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local", action="store_true", help="one engine in this process instead of a Ray pool")
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-color", action="store_true")
    sys.exit(asyncio.run(main(parser.parse_args())))

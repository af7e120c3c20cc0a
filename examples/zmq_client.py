"""Talk to ``rollout serve`` over ZeroMQ: a tool-using (calculator) episode run by the server, then the same
kind of episode driven turn by turn from this client.

    rollout serve --model smollm2 --local                 # terminal 1 (or --workers 2 for a Ray pool)
    python examples/zmq_client.py                         # terminal 2

Token in, token out: the server sees only token ids. This script decodes them for printing with the
SmolLM2 tokenizer (``engine.smollm2.ensure_smollm2()`` + transformers' AutoTokenizer).
"""
from __future__ import annotations

import argparse
import asyncio

from engine.sampling import SamplingParams
from engine.smollm2 import ensure_smollm2
from rollout.client import AsyncRolloutClient, RolloutClient
from rollout.trajectory import Trajectory


def print_transcript(title: str, traj: Trajectory, tok) -> None:
    """Prompt, then each run of model tokens (loss mask 1) and environment tokens (loss mask 0)."""
    print(f"==== {title}: {traj.turns} turns, reward {traj.reward}, finish_reason {traj.finish_reason!r}")
    print(f"[prompt, {len(traj.prompt_ids)} tokens]\n{tok.decode(traj.prompt_ids)}")
    start = 0
    for i in range(1, len(traj.token_ids) + 1):
        if i == len(traj.token_ids) or traj.loss_mask[i] != traj.loss_mask[start]:
            who = "model" if traj.loss_mask[start] else "environment"
            span = traj.token_ids[start:i]
            extra = ""
            if traj.loss_mask[start]:
                lp = traj.logprobs[start:i]
                extra = f", mean logprob {sum(lp) / len(lp):.3f}, policy versions {sorted(set(traj.versions[start:i]))}"
            print(f"[{who}, {len(span)} tokens{extra}]\n{tok.decode(span)}")
            start = i
    print()


async def sample_episodes(address: str, question: str, params: SamplingParams, seeds: list[int],
                          timeout_s: float) -> list[Trajectory]:
    """Several server-side episodes at once over one connection (they share the engine's batches)."""
    async with AsyncRolloutClient(address, timeout_s=timeout_s) as client:
        return await asyncio.gather(*(
            client.run_episode("calculator", {"question": question, "few_shot": True},
                               SamplingParams(max_tokens=params.max_tokens, temperature=0.7, seed=seed), max_turns=3)
            for seed in seeds))


def follow_up_ids(tok, text: str, model_ended_turn: bool) -> list[int]:
    """A ChatML user message plus the assistant prompt, appended after the model's turn (never re-tokenizing
    the history); closes the assistant turn first if it was cut by max_tokens."""
    chatml = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return tok.encode(("\n" if model_ended_turn else "<|im_end|>\n") + chatml, add_special_tokens=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default="tcp://127.0.0.1:5555")
    ap.add_argument("--question", default="37 * 23 + 14")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--episodes", type=int, default=4, help="sampled server-side episodes run at once")
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(ensure_smollm2()))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)

    with RolloutClient(args.address, timeout_s=args.timeout) as client:
        print("health:", client.health())

        # 1. Server-side agent loop: the worker runs the calculator environment between turns. Greedy first,
        #    then a few sampled episodes at once; the longest (most tool use) is printed too.
        episode = client.run_episode("calculator", {"question": args.question, "few_shot": True}, params, max_turns=3)
        print_transcript(f"run_episode('calculator', question={args.question!r}, greedy)", episode, tok)
        sampled = asyncio.run(sample_episodes(args.address, args.question, params, list(range(args.episodes)),
                                              args.timeout))
        print(f"{len(sampled)} sampled episodes: turns {[t.turns for t in sampled]}, "
              f"rewards {[t.reward for t in sampled]}")
        best = max(sampled, key=lambda t: (t.turns, t.reward or 0.0))
        print_transcript("run_episode('calculator', temperature 0.7), the one with the most turns", best, tok)

        # 2. Client-driven session: the same environment here, two turns through step_session. The session's
        #    KV stays on the server between the turns, so turn 2 prefills only the observation.
        from rollout.envs.calculator import CalculatorEnvironment
        env = CalculatorEnvironment(tok, question=args.question)
        session = client.open_session()
        first = env.reset()
        turn1 = client.step_session(session, first, params)
        print(f"turn 1: {tok.decode(turn1.token_ids)!r} ({turn1.finish_reason})")
        observation, reward, done = env.step(turn1.token_ids)
        if done:   # no tool call: ask for one, as a user would (still a loss-mask-0 turn)
            ended = bool(turn1.token_ids) and turn1.token_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
            observation = follow_up_ids(tok, "Check it with the calculator: reply with <calc>EXPRESSION</calc>.",
                                        ended)
        print(f"observation: {tok.decode(observation)!r}")
        turn2 = client.step_session(session, observation, params)
        print(f"turn 2: {tok.decode(turn2.token_ids)!r} ({turn2.finish_reason})")
        if not done:
            _, reward, done = env.step(turn2.token_ids)
        whole = client.close_session(session)
        whole.reward = reward
        print_transcript(f"client-driven session {session}", whole, tok)

        s = client.stats()
        print("server:", {k: s["frontend"][k] for k in ("received", "replied", "ok") if k in s["frontend"]})


if __name__ == "__main__":
    main()

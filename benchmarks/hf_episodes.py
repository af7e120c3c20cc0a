"""The baseline rollout of benchmarks/rl_step.py: environment episodes run in the trainer's own process with
transformers' ``generate`` (what TRL does without vLLM), producing the same ``Trajectory`` objects as the
service's server-side agent loop (rollout/episode.py) so ``rollout.ppo_step.train_step`` runs on them unchanged.

Per turn, one batched ``generate`` over the episodes still running: each one's whole history (prompt, model and
observation tokens) left-padded and prefilled again, since transformers keeps no KV cache between calls.
Sampling draws from the full temperature-scaled distribution (top-k and top-p off, as ``SamplingParams``'
defaults), and each token's logprob is read from ``generate``'s scores at that temperature.

What the agent loop does that this does too: the same environment objects (``get_environment``: reset, then
step on exactly the tokens sampled in the turn, the stop token included when sampled), the episode ends on
``done`` or after ``max_turns`` model turns, the final observation is not appended, rewards are summed, and
``max_model_len`` bounds context + output as the engine's scheduler does (a turn's ``max_tokens`` is clamped to
the room left; a context that leaves none ends the episode as "length").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rollout.environment import get_environment
from rollout.trajectory import Trajectory


@dataclass(frozen=True)
class HFEpisodeConfig:
    temperature: float          # 0: greedy (scores then hold the raw logits, logprobs at temperature 1)
    max_tokens: int             # new tokens per model turn
    max_turns: int              # model turns per episode
    eos_token_ids: tuple[int, ...]  # a turn ends after sampling one of these (the engine's ModelConfig.eos_token_ids)
    pad_token_id: int
    max_model_len: int          # context limit, as the engine's

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"HFEpisodeConfig.temperature must be >= 0, got {self.temperature!r}")
        for name in ("max_tokens", "max_turns", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"HFEpisodeConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.eos_token_ids:
            raise ValueError("HFEpisodeConfig.eos_token_ids must name at least one token")


@dataclass
class _Running:
    index: int                  # position in the caller's env_kwargs list
    env: Any
    traj: Trajectory


def _left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids and attention mask, each sequence right-aligned (left padding, what decoder-only generate needs)."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, length - len(s):] = 1
    return ids.to(device), mask.to(device)


def _cut(ids: list[int], logprobs: list[float], eos: frozenset[int], limit: int
         ) -> tuple[list[int], list[float], bool]:
    """A row of ``generate``'s new tokens up to and including its first stop token (after it: padding), at most
    ``limit`` of them; True if it stopped on the stop token."""
    for j, t in enumerate(ids[:limit]):
        if t in eos:
            return ids[:j + 1], logprobs[:j + 1], True
    return ids[:limit], logprobs[:limit], False


@torch.no_grad()
def generate_turn(model: torch.nn.Module, contexts: list[list[int]], cfg: HFEpisodeConfig
                  ) -> list[tuple[list[int], list[float], bool]]:
    """One batched ``generate`` over ``contexts``: per row (new token ids, their logprobs, stopped on EOS), each
    row at most ``max_tokens`` and what ``max_model_len`` leaves it (rows generate alike, then are cut)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids, mask = _left_pad(contexts, cfg.pad_token_id, device)
    sample = cfg.temperature > 0
    # NOTE: generate fills the fields left None from the checkpoint's generation_config.json (SmolLM2's and the
    # random models' hold token ids only): what shapes the distribution is set here, as the engine samples
    knobs = dict(temperature=cfg.temperature, top_k=0, top_p=1.0, repetition_penalty=1.0) if sample else {}
    gen = GenerationConfig(do_sample=sample, max_new_tokens=cfg.max_tokens, eos_token_id=list(cfg.eos_token_ids),
                           pad_token_id=cfg.pad_token_id, output_scores=True, return_dict_in_generate=True, **knobs)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    new = out.sequences[:, ids.shape[1]:]                                    # [B, T]
    # scores are the processed logits (divided by the temperature): normalised, the sampled token's logprob
    # under the tempered full distribution, what the engine returns and train_step recomputes
    # (what compute_transition_scores(normalize_logits=True) computes, one step at a time: it stacks every step's
    # [B, V] scores into one tensor first, 25 GB at 128 rows x 1024 tokens x 49k ids, which ran out of memory)
    lps = torch.stack([torch.log_softmax(step.float(), dim=-1).gather(-1, new[:, t:t + 1]).squeeze(-1)
                       for t, step in enumerate(out.scores)], dim=1)                    # [B, T]
    eos = frozenset(cfg.eos_token_ids)
    return [_cut(row.tolist(), lp.tolist(), eos, cfg.max_model_len - len(c))
            for row, lp, c in zip(new.cpu(), lps.cpu(), contexts)]


def run_hf_episodes(model: torch.nn.Module, tokenizer: Any, env_name: str, env_kwargs: list[dict[str, Any]],
                    cfg: HFEpisodeConfig, version: int) -> list[Trajectory]:
    """Run every episode to its end, turn by turn in lockstep; trajectories in ``env_kwargs`` order, every model
    token tagged with ``version`` (the trainer's own weights sample: nothing is stale)."""
    was_training = model.training
    model.eval()
    running = []
    for i, kw in enumerate(env_kwargs):
        env = get_environment(env_name, tokenizer=tokenizer, **kw)
        running.append(_Running(i, env, Trajectory(prompt_ids=list(env.reset()))))
    done: list[Trajectory | None] = [None] * len(env_kwargs)
    try:
        while running:
            fits = []
            for r in running:
                if len(r.traj.prompt_ids) + len(r.traj.token_ids) < cfg.max_model_len:
                    fits.append(r)
                else:       # the engine refuses such a turn (TOO_LARGE): the episode ends truncated
                    r.traj.finish_reason = "length"
                    done[r.index] = r.traj
            outs = generate_turn(model, [r.traj.prompt_ids + r.traj.token_ids for r in fits], cfg) if fits else []
            still = []
            for r, (ids, lps, stopped) in zip(fits, outs):
                # the whole context went through the model again (left padding not counted)
                r.traj.metrics["num_prefill_tokens"] = (r.traj.metrics.get("num_prefill_tokens", 0)
                                                        + len(r.traj.prompt_ids) + len(r.traj.token_ids))
                r.traj.add_model_tokens(ids, lps, [version] * len(ids))
                r.traj.turns += 1
                r.traj.finish_reason = "stop" if stopped else "length"
                obs, reward, finished = r.env.step(list(ids))
                r.traj.reward = (r.traj.reward or 0.0) + float(reward)
                if finished or r.traj.turns >= cfg.max_turns:
                    done[r.index] = r.traj
                else:
                    r.traj.add_env_tokens(list(obs))
                    still.append(r)
            running = still
    finally:
        model.train(was_training)
    assert all(t is not None for t in done)
    return done  # type: ignore[return-value]

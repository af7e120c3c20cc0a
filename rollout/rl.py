"""Trainer-side helpers for trajectories (used by examples/ppo.py): batching, recomputing log-probabilities with the
trainer's model, group-relative advantages, the clipped surrogate with a KL penalty.

Tested on a tiny model against per-token loops in tests/rollout/test_rl.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rollout.trajectory import Trajectory


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, L] prompt + generated/observation tokens, right-padded
    attention_mask: torch.Tensor  # [B, L]
    targets: torch.Tensor         # [B, L-1] token at position t+1 (what logits[t] predicts)
    loss_mask: torch.Tensor       # [B, L-1] 1 where targets[t] is a model token
    old_logprobs: torch.Tensor    # [B, L-1] behaviour logprobs from the engine (0 elsewhere)
    advantages: torch.Tensor      # [B, L-1] per-token advantage (the trajectory's, on model tokens)


def group_advantages(rewards: list[float], group_size: int, eps: float = 1e-4) -> list[float]:
    """GRPO: each group of ``group_size`` consecutive samples shares a question; a sample's
    advantage is its reward minus the group mean, over the group std (0 for a uniform group)."""
    assert len(rewards) % group_size == 0
    out = []
    for g in range(0, len(rewards), group_size):
        group = rewards[g:g + group_size]
        mean = sum(group) / group_size
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / group_size)
        out += [(r - mean) / (std + eps) if std > 0 else 0.0 for r in group]
    return out


def make_batch(trajs: list[Trajectory], advantages: list[float], pad_id: int) -> Batch:
    seqs = [t.prompt_ids + t.token_ids for t in trajs]
    length = max(len(s) for s in seqs)
    b = len(trajs)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    loss_mask = torch.zeros((b, length - 1))
    old_lp = torch.zeros((b, length - 1))
    adv = torch.zeros((b, length - 1))
    for i, (t, s, a) in enumerate(zip(trajs, seqs, advantages)):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention_mask[i, :len(s)] = 1
        # token_ids[j] sits at position len(prompt) + j and is predicted by logits at position len(prompt) + j - 1
        start = len(t.prompt_ids) - 1
        n = len(t.token_ids)
        loss_mask[i, start:start + n] = torch.tensor(t.loss_mask, dtype=torch.float32)
        old_lp[i, start:start + n] = torch.tensor(t.logprobs, dtype=torch.float32)
        adv[i, start:start + n] = a
    return Batch(input_ids, attention_mask, input_ids[:, 1:], loss_mask, old_lp, adv * loss_mask)


def token_logprobs(model: torch.nn.Module, batch: Batch, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of each target token under ``model`` -> [B, L-1], filled only where
    ``batch.loss_mask`` is 1 (0 elsewhere): the engine's behaviour logprobs use the same
    full-vocabulary, temperature-scaled distribution.

    The LM head and the log-softmax run only on model-token positions (a third of a tool
    trajectory, typically): for a Hugging Face causal LM the decoder stack's hidden states are taken
    from ``model.model`` and projected with ``model.lm_head``."""
    mask = batch.loss_mask.bool()                              # [B, L-1]
    base, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    out = torch.zeros(mask.shape, device=batch.input_ids.device)
    if base is None or head is None:                           # any other model: full logits
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        return logp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) * mask
    hidden = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0][:, :-1]  # [B, L-1, H]
    logits = head(hidden[mask]).float() / temperature          # [N, V], N = model tokens
    picked = torch.log_softmax(logits, dim=-1).gather(-1, batch.targets[mask].unsqueeze(-1)).squeeze(-1)
    return out.masked_scatter(mask, picked)


@dataclass
class LossOut:
    loss: torch.Tensor
    policy_loss: float
    kl: float
    clip_frac: float
    ratio_abs_dev: float     # mean |ratio - 1| over model tokens (1e-3 scale at epoch 0 = no train/infer mismatch)


def ppo_loss(new_lp: torch.Tensor, batch: Batch, ref_lp: torch.Tensor, clip_eps: float, kl_coef: float) -> LossOut:
    """Clipped surrogate on the behaviour logprobs + k3 KL to the reference, token-mean over model tokens."""
    mask = batch.loss_mask
    n = mask.sum().clamp(min=1.0)
    ratio = torch.exp(new_lp - batch.old_logprobs)
    surr = torch.minimum(ratio * batch.advantages, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * batch.advantages)
    policy_loss = -(surr * mask).sum() / n
    # k3 estimator of KL(pi || ref): exp(ref - new) - (ref - new) - 1 >= 0
    diff = ref_lp - new_lp
    kl = ((torch.exp(diff) - diff - 1) * mask).sum() / n
    loss = policy_loss + kl_coef * kl
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps).float()
        clip_frac = (clipped * mask).sum() / n
        dev = ((ratio - 1).abs() * mask).sum() / n
    return LossOut(loss, policy_loss.item(), kl.item(), clip_frac.item(), dev.item())

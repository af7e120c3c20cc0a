"""Trainer-side helpers for trajectories (used by examples/ppo.py): batching, recomputing log-probabilities with the
trainer's model, group-relative advantages, the clipped surrogate with a KL penalty, truncated importance sampling
(TIS) for off-policy tokens, and the staleness of a batch from its per-token versions.

Three policies meet in a training step (names as in the loss below):
- behaviour: the engine's weights that sampled each token (``Batch.behaviour_logprobs``, version ``Batch.versions``);
- old: the trainer's weights at the start of the step, before its first update (``old_lp``, recomputed);
- new: the trainer's weights being optimized (``new_lp``).
On-policy (staleness 0) behaviour and old agree to float rounding; with asynchronous rollouts a token may have been
sampled one or more versions ago, and TIS corrects for that.

Tested on a tiny model against per-token loops in tests/rollout/test_rl.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch

from rollout.chunked_logprobs import token_logprobs_chunked
from rollout.trajectory import ENV_VERSION, Trajectory


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, L] prompt + generated/observation tokens, right-padded
    attention_mask: torch.Tensor  # [B, L]
    targets: torch.Tensor         # [B, L-1] token at position t+1 (what logits[t] predicts)
    loss_mask: torch.Tensor       # [B, L-1] 1 where targets[t] is a model token
    behaviour_logprobs: torch.Tensor  # [B, L-1] logprob the engine sampled targets[t] with (0 elsewhere)
    advantages: torch.Tensor      # [B, L-1] per-token advantage (the trajectory's, on model tokens)
    versions: torch.Tensor        # [B, L-1] int64: weight version that sampled targets[t]; ENV_VERSION elsewhere
    # MoE rollouts that returned their routing: per row, [P, MoE layers, k] expert ids (or None); token_logprobs
    # then replays them in the model's forward (rollout.routing_replay)
    routed_experts: Optional[list] = None

    def to(self, device: torch.device | str) -> "Batch":
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "routed_experts"}
        return Batch(**moved, routed_experts=self.routed_experts)


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
    if not trajs:
        raise ValueError("make_batch needs at least one trajectory")
    if len(advantages) != len(trajs):
        raise ValueError(f"make_batch: {len(trajs)} trajectories but {len(advantages)} advantages")
    for i, (t, a) in enumerate(zip(trajs, advantages)):
        if not t.prompt_ids:
            raise ValueError(f"trajectory {i}: empty prompt_ids (its first token would have no logit to score it)")
        if not math.isfinite(a):
            raise ValueError(f"trajectory {i}: advantage {a!r} is not finite")
    seqs = [t.prompt_ids + t.token_ids for t in trajs]
    length = max(len(s) for s in seqs)
    b = len(trajs)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    loss_mask = torch.zeros((b, length - 1))
    behaviour_lp = torch.zeros((b, length - 1))
    adv = torch.zeros((b, length - 1))
    versions = torch.full((b, length - 1), ENV_VERSION, dtype=torch.long)
    for i, (t, s, a) in enumerate(zip(trajs, seqs, advantages)):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention_mask[i, :len(s)] = 1
        # token_ids[j] sits at position len(prompt) + j and is predicted by logits at position len(prompt) + j - 1
        start = len(t.prompt_ids) - 1
        n = len(t.token_ids)
        loss_mask[i, start:start + n] = torch.tensor(t.loss_mask, dtype=torch.float32)
        behaviour_lp[i, start:start + n] = torch.tensor(t.logprobs, dtype=torch.float32)
        versions[i, start:start + n] = torch.tensor(t.versions, dtype=torch.long)
        adv[i, start:start + n] = a
    routed = [t.routed_experts_tensor() for t in trajs]
    return Batch(input_ids, attention_mask, input_ids[:, 1:], loss_mask, behaviour_lp, adv * loss_mask, versions,
                 routed_experts=routed if any(r is not None for r in routed) else None)


@dataclass(frozen=True)
class Staleness:
    """How many weight versions behind the trainer the model tokens of a batch were sampled."""
    max: int            # largest ``current_version - version`` over model tokens (0 when there are none)
    mean: float         # its mean over model tokens (0.0 when there are none)
    num_tokens: int     # model tokens counted


def staleness(versions: torch.Tensor, loss_mask: torch.Tensor, current_version: int) -> Staleness:
    """Staleness of the model tokens (``loss_mask`` 1) of ``versions`` (any shape, e.g. ``Batch.versions``)
    against the trainer's ``current_version``. Environment tokens and padding (mask 0, ENV_VERSION) are
    ignored. A model token without a version, or from a version newer than the trainer's, is an error: it
    would make the off-policy correction silently wrong."""
    if isinstance(current_version, bool) or not isinstance(current_version, int) or current_version < 0:
        raise ValueError(f"current_version must be an int >= 0, got {current_version!r}")
    if versions.shape != loss_mask.shape:
        raise ValueError(f"versions {tuple(versions.shape)} and loss_mask {tuple(loss_mask.shape)} differ in shape")
    if versions.dtype.is_floating_point:
        raise ValueError(f"versions must be an integer tensor, got {versions.dtype}")
    sampled = versions[loss_mask.bool()]
    if sampled.numel() == 0:
        return Staleness(0, 0.0, 0)
    if (sampled < 0).any():
        raise ValueError(f"{int((sampled < 0).sum())} model tokens have a negative version (ENV_VERSION is for "
                         f"environment tokens, which have loss mask 0)")
    newest = int(sampled.max())
    if newest > current_version:
        raise ValueError(f"a model token was sampled by version {newest}, newer than the trainer's {current_version}")
    lag = current_version - sampled
    return Staleness(int(lag.max()), int(lag.sum()) / sampled.numel(), int(sampled.numel()))   # exact mean


def token_logprobs(model: torch.nn.Module, batch: Batch, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of each target token under ``model`` -> [B, L-1], filled only where
    ``batch.loss_mask`` is 1 (0 elsewhere): the engine's behaviour logprobs use the same
    full-vocabulary, temperature-scaled distribution.

    The LM head and the log-softmax run only on model-token positions (a third of a tool
    trajectory, typically): for a Hugging Face causal LM the decoder stack's hidden states are taken
    from ``model.model`` and projected with ``model.lm_head``. A model with its own ``token_logprobs(batch,
    temperature)`` (the batch-invariant ``InvariantPolicy``) computes them itself. A batch with routed experts (MoE
    rollouts that returned them) replays them in the forward of ``model``, the reference's as well as the policy's."""
    own = getattr(model, "token_logprobs", None)
    if callable(own):   # a policy with its own forward (engine.models.invariant_policy.InvariantPolicy)
        return own(batch, temperature)
    if batch.routed_experts is not None:   # MoE: the rollout's experts, not the trainer's own choice
        from rollout.routing_replay import replay_routing
        with replay_routing(model, batch.routed_experts):
            return _token_logprobs(model, batch, temperature)
    return _token_logprobs(model, batch, temperature)


def _token_logprobs(model: torch.nn.Module, batch: Batch, temperature: float) -> torch.Tensor:
    mask = batch.loss_mask.bool()                              # [B, L-1]
    base, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    out = torch.zeros(mask.shape, device=batch.input_ids.device)
    if base is None or head is None:                           # any other model: full logits
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        return logp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) * mask
    hidden = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0][:, :-1]  # [B, L-1, H]
    if isinstance(head, torch.nn.Linear) and head.bias is None:
        # a chunk of rows at a time, forward and backward: never the [N, V] float32 logits and their
        # log-softmax and gradients at once (rollout.chunked_logprobs)
        picked = token_logprobs_chunked(hidden[mask], head.weight, batch.targets[mask], temperature)
    else:
        logits = head(hidden[mask]).float() / temperature      # [N, V], N = model tokens
        picked = torch.log_softmax(logits, dim=-1).gather(-1, batch.targets[mask].unsqueeze(-1)).squeeze(-1)
    return out.masked_scatter(mask, picked)


@dataclass
class LossOut:
    loss: torch.Tensor
    policy_loss: float
    kl: float
    clip_frac: float
    ratio_abs_dev: float     # mean |ratio - 1| of the PPO ratio (new over behaviour, or over old with TIS)
    tis_weight_mean: float   # mean TIS weight min(pi_old / pi_behaviour, C) over model tokens (1.0 without TIS)
    tis_capped_frac: float   # fraction of model tokens whose weight hit the cap C (0.0 without TIS)


def ppo_loss(new_lp: torch.Tensor, batch: Batch, ref_lp: torch.Tensor, clip_eps: float, kl_coef: float, *,
             old_lp: Optional[torch.Tensor] = None, tis_cap: float = 0.0) -> LossOut:
    """Clipped surrogate + ``kl_coef`` x k3 KL to the reference, token-mean over model tokens.

    Without TIS (``tis_cap`` 0, ``old_lp`` None) the ratio is new over behaviour: right when every token is
    on-policy (sampled by the weights the step starts from), where the two agree to float rounding.

    With TIS (``tis_cap`` C > 0 and ``old_lp``, the trainer's logprobs under the step's starting weights):
    the ratio is new over old, so clipping bounds how far this step moves the trainer's own policy, and each
    token's surrogate is multiplied by the truncated importance weight min(pi_old / pi_behaviour, C)
    (detached), which re-weights tokens sampled by an older engine version towards the old policy's
    distribution; the cap bounds the variance a token the old policy likes far more than the sampler did
    would add (the "truncated importance sampling" correction of veRL/AReaL-style off-policy training).
    The KL penalty is not re-weighted: it is a regulariser on the sampled tokens, not an estimate of the
    policy gradient."""
    mask = batch.loss_mask
    for name, t in (("new_lp", new_lp), ("ref_lp", ref_lp), ("old_lp", old_lp)):
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"ppo_loss: {name} has shape {tuple(t.shape)}, the batch's loss_mask {tuple(mask.shape)}")
    if isinstance(tis_cap, bool) or not isinstance(tis_cap, (int, float)) or not tis_cap >= 0:
        raise ValueError(f"tis_cap must be a number >= 0 (0 = off), got {tis_cap!r}")
    if (tis_cap > 0) != (old_lp is not None):
        raise ValueError("TIS needs both tis_cap > 0 and old_lp (the trainer's logprobs under the step's starting "
                         f"weights); got tis_cap={tis_cap!r} and old_lp {'set' if old_lp is not None else 'None'}")
    n = mask.sum().clamp(min=1.0)
    if old_lp is None:
        ratio = torch.exp(new_lp - batch.behaviour_logprobs)
        tis_w = torch.ones_like(mask)
        capped = torch.zeros_like(mask)
    else:
        # old_lp is a constant of the step (detached: at the first epoch it may be new_lp itself)
        old_lp = old_lp.detach()
        ratio = torch.exp(new_lp - old_lp)
        behaviour_ratio = torch.exp(old_lp - batch.behaviour_logprobs)     # pi_old / pi_behaviour
        tis_w = behaviour_ratio.clamp(max=tis_cap)
        capped = (behaviour_ratio > tis_cap).float()
    surr = torch.minimum(ratio * batch.advantages, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * batch.advantages)
    policy_loss = -(tis_w * surr * mask).sum() / n
    # k3 estimator of KL(pi || ref): exp(ref - new) - (ref - new) - 1 >= 0
    diff = ref_lp - new_lp
    kl = ((torch.exp(diff) - diff - 1) * mask).sum() / n
    loss = policy_loss + kl_coef * kl
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps).float()
        clip_frac = (clipped * mask).sum() / n
        dev = ((ratio - 1).abs() * mask).sum() / n
        tis_mean = (tis_w * mask).sum() / n
        capped_frac = (capped * mask).sum() / n
    return LossOut(loss, policy_loss.item(), kl.item(), clip_frac.item(), dev.item(), tis_mean.item(),
                   capped_frac.item())


@dataclass(frozen=True)
class Mismatch:
    """Train/inference agreement on the tokens sampled by the trainer's own current weights."""
    abs_dev: float      # mean |pi_trainer / pi_behaviour - 1| over those tokens (0.0 when there are none)
    num_tokens: int     # how many there were (0: every token was stale, nothing to compare)
    max_abs_dev: float = 0.0  # the largest |pi_trainer / pi_behaviour - 1| among them


def behaviour_mismatch(trainer_lp: torch.Tensor, batch: Batch, current_version: int) -> Mismatch:
    """Compare the trainer's logprobs (under weights of ``current_version``) with the engine's behaviour
    logprobs on the model tokens that version sampled: with exact log-probabilities both sides agree to
    float rounding (1e-5 scale), so a larger value is a train/inference mismatch (different weights,
    temperature, kernels). Stale tokens are left out: they differ by the policy change, legitimately."""
    if trainer_lp.shape != batch.loss_mask.shape:
        raise ValueError(f"trainer_lp has shape {tuple(trainer_lp.shape)}, the batch's {tuple(batch.loss_mask.shape)}")
    fresh = batch.loss_mask.bool() & (batch.versions == current_version)
    count = int(fresh.sum())
    if count == 0:
        return Mismatch(0.0, 0)
    with torch.no_grad():
        dev = (torch.exp(trainer_lp.detach()[fresh] - batch.behaviour_logprobs[fresh]) - 1).abs()
    return Mismatch(dev.mean().item(), count, dev.max().item())

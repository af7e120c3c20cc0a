"""One PPO step of a trainer on trajectories from the service (shared by examples/ppo.py and
benchmarks/rl_step.py): ``epochs`` passes of the clipped surrogate with a k3 KL penalty to a frozen reference,
one optimizer step per epoch (gradients accumulated over microbatches, token-mean over the whole step), and
optionally truncated importance sampling against the step's starting policy (``rollout.rl.ppo_loss``).

At the first epoch no optimizer step has happened yet, so the trainer's logprobs are those of the weights that
sampled the fresh tokens: ``TrainStats`` reports their agreement with the engine's behaviour logprobs (mean and
max |ratio - 1|), the train/inference mismatch check.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from rollout.rl import behaviour_mismatch, make_batch, ppo_loss, token_logprobs
from rollout.trajectory import Trajectory


@dataclass(frozen=True)
class PPOStepConfig:
    epochs: int = 2
    minibatch: int = 8            # trajectories per forward/backward
    clip: float = 0.2
    kl_coef: float = 0.02
    tis_cap: float = 0.0          # 0: off (on-policy); C > 0: TIS weight min(pi_old / pi_behaviour, C)
    temperature: float = 1.0      # the sampling temperature: logprobs are of the tempered distribution
    max_grad_norm: float = 1.0
    # Mixed precision for the trainer's forward and backward ("bfloat16"/"float16"; None: the weights' dtype):
    # the usual fp32-master-weights, bf16-compute setup. The log-softmax stays in fp32 (token_logprobs upcasts).
    autocast_dtype: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("epochs", "minibatch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PPOStepConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("clip", "kl_coef", "tis_cap", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"PPOStepConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ValueError(f"PPOStepConfig.temperature must be > 0, got {self.temperature!r}")
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"PPOStepConfig.autocast_dtype must be None, 'bfloat16' or 'float16', got "
                             f"{self.autocast_dtype!r}")

    def autocast(self, device: torch.device):
        """The forward's autocast context (a no-op without ``autocast_dtype``)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, self.autocast_dtype))


@dataclass
class TrainStats:
    """What one PPO step's epochs measured. Means are token-weighted over the step's model tokens."""
    kl: float                       # k3 KL to the reference at the first epoch (on the step's own samples)
    kl_epochs: list[float]          # the same per epoch (later epochs: off-policy, heavy-tailed)
    policy_loss: float              # mean over epochs
    clip_frac: float                # mean over epochs of the fraction of tokens with |ratio - 1| > clip
    clip_frac_epochs: list[float]
    first_epoch_ratio_abs_dev: Optional[float]  # mean |pi_trainer / pi_engine - 1| at the first epoch, on
                                                # the tokens the trainer's version sampled (None: none were)
    first_epoch_ratio_max_dev: Optional[float]  # the largest such |ratio - 1|
    mismatch_tokens: int            # how many tokens that check covered
    tis_weight_mean: float          # mean min(pi_old / pi_behaviour, C) (1.0 with TIS off)
    tis_capped_frac: float          # fraction of tokens whose weight hit C (0.0 with TIS off)
    grad_norms: list[float]         # before clipping, one per optimizer step
    lrs: list[float]                # learning rate of each optimizer step
    update_norm: float              # L2 norm of the step's change to the parameters


def train_step(policy: torch.nn.Module, reference: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler, trajs: list[Trajectory], advantages: list[float], cfg: PPOStepConfig, pad_id: int,
               device: torch.device, version: int) -> TrainStats:
    """``cfg.epochs`` passes over ``trajs`` with the trainer at weight ``version``: one optimizer step per
    epoch, so every ratio of the first epoch is measured before any update of this step. ``scheduler``:
    a learning-rate scheduler stepped after each optimizer step, or None."""
    if not trajs:
        raise ValueError("train_step needs at least one trajectory")
    policy.train()
    num_tokens = max(1, sum(t.num_model_tokens for t in trajs))
    micro = [list(range(i, min(i + cfg.minibatch, len(trajs)))) for i in range(0, len(trajs), cfg.minibatch)]
    batches = [make_batch([trajs[i] for i in idx], [advantages[i] for i in idx], pad_id).to(device) for idx in micro]
    weights = [b.loss_mask.sum().item() / num_tokens for b in batches]     # token-mean over the whole step
    with torch.no_grad(), cfg.autocast(device):
        ref_lps = [token_logprobs(reference, b, cfg.temperature) for b in batches]
    before = [p.detach().clone() for p in policy.parameters()]
    kl_epochs, clip_epochs, loss_epochs, grad_norms, lrs = [], [], [], [], []
    dev_sum, dev_max, dev_tokens, tis_mean, tis_capped = 0.0, 0.0, 0, 0.0, 0.0
    old_lps: list[Optional[torch.Tensor]] = [None] * len(batches)   # the step's starting policy, with TIS
    for epoch in range(cfg.epochs):
        optimizer.zero_grad(set_to_none=True)
        kl = clip = loss = 0.0
        for i, (batch, ref_lp, weight) in enumerate(zip(batches, ref_lps, weights)):
            with cfg.autocast(device):
                new_lp = token_logprobs(policy, batch, cfg.temperature)
            if epoch == 0:
                mismatch = behaviour_mismatch(new_lp, batch, version)
                dev_sum += mismatch.abs_dev * mismatch.num_tokens
                dev_max = max(dev_max, mismatch.max_abs_dev)
                dev_tokens += mismatch.num_tokens
                if cfg.tis_cap > 0:
                    # NOTE: no optimizer step happens inside an epoch, so the first epoch's forward is the old
                    # policy's: no extra forward pass needed to recompute it
                    old_lps[i] = new_lp.detach()
            res = ppo_loss(new_lp, batch, ref_lp, cfg.clip, cfg.kl_coef, old_lp=old_lps[i], tis_cap=cfg.tis_cap)
            (res.loss * weight).backward()
            kl += res.kl * weight
            clip += res.clip_frac * weight
            loss += res.policy_loss * weight
            if epoch == 0:     # old and behaviour logprobs are fixed for the step: so are the TIS weights
                tis_mean += res.tis_weight_mean * weight
                tis_capped += res.tis_capped_frac * weight
        kl_epochs.append(kl)
        clip_epochs.append(clip)
        loss_epochs.append(loss)
        grad_norms.append(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm).item())
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    with torch.no_grad():
        update_norm = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(policy.parameters(), before))).item()
    return TrainStats(kl=kl_epochs[0], kl_epochs=kl_epochs, policy_loss=sum(loss_epochs) / len(loss_epochs),
                      clip_frac=sum(clip_epochs) / len(clip_epochs), clip_frac_epochs=clip_epochs,
                      first_epoch_ratio_abs_dev=dev_sum / dev_tokens if dev_tokens else None,
                      first_epoch_ratio_max_dev=dev_max if dev_tokens else None,
                      mismatch_tokens=dev_tokens, tis_weight_mean=tis_mean, tis_capped_frac=tis_capped,
                      grad_norms=grad_norms, lrs=lrs, update_norm=update_norm)

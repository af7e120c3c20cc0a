"""The step loops of benchmarks/rl_step.py: ours synchronous (colocated, sleep while training), ours one step
off-policy, and the transformers-generate baseline; each returns a ``VariantResult`` of per-step records."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from benchmarks.hf_episodes import HFEpisodeConfig, run_hf_episodes
from engine import EngineConfig, SamplingParams
from rollout.ppo_step import PPOStepConfig, TrainStats, train_step
from rollout.rl import group_advantages, staleness
from rollout.trajectory import Trajectory
from rollout.weight_push import PushReport, WeightPusher

logger = logging.getLogger("rl_step")

VARIANTS = {"sync": "ours, colocated synchronous",
            "async": "ours, one step off-policy (TIS)",
            "hf": "baseline: transformers generate in the trainer"}


@dataclass
class Context:
    """What every variant shares (built once by benchmarks/rl_step.py)."""
    model_dir: Any                  # the model folder: trainer (fp32) and engine load it
    device: torch.device            # the trainer's
    engine_config: EngineConfig
    params: SamplingParams          # the engine's sampling (temperature, max_tokens per turn)
    ppo: PPOStepConfig              # the on-policy step (sync, hf); async adds tis_cap
    tis_cap: float
    hf: HFEpisodeConfig             # the baseline's sampling, the same as ``params``
    env: str
    max_turns: int
    group_size: int                 # n: consecutive episodes of one question (GRPO group)
    lr: float
    steps: int                      # timed steps (after one warm-up)
    pad_id: int
    worker_cpus: float
    env_kwargs: Callable[[int], list[dict[str, Any]]]   # step -> the step's episodes
    tokenizer: Any


@dataclass
class StepRecord:
    step: int                   # 0: the warm-up (left out of the means)
    version: int                # the trainer's weight version this step trained at
    rollout_s: float            # submission to the last episode done (async: beside the previous step's training)
    rollout_wait_s: float       # of that, how long the trainer waited for its episodes
    train_s: float              # train_step
    weight_sync_s: float        # pushing the new weights to the pool, every worker applied (0: baseline)
    sync_pack_s: float          # of that, the trainer's share (packing into IPC buffers / host memory)
    sync_apply_s: float         # of that, the slowest worker's apply inside its engine
    sleep_wake_s: float         # pool.sleep(1) + torch.cuda.empty_cache() + pool.wake_up() (sync only)
    sleep_freed_bytes: int      # device memory the engine gave back at sleep (sync only)
    step_s: float               # the step's wall time as the trainer sees it
    episodes: int
    model_tokens: int
    env_tokens: int
    prefill_tokens: int         # tokens run through prefill (engine: its count; baseline: each turn's whole context)
    turns_mean: float
    reward_mean: float
    staleness_max: int          # of the model tokens, from their per-token versions, against ``version``
    staleness_mean: float
    ratio_dev: Optional[float]  # first epoch mean |pi_trainer / pi_behaviour - 1| on fresh tokens (None: none)
    sync_transport: str
    sync_bytes: int


@dataclass
class VariantResult:
    key: str
    name: str
    warmup: StepRecord
    steps: list[StepRecord] = field(default_factory=list)

    def mean(self, name: str) -> float:
        return sum(getattr(s, name) for s in self.steps) / len(self.steps)

    @property
    def rollout_tok_s(self) -> float:
        return sum(s.model_tokens for s in self.steps) / sum(s.rollout_s for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        means = {f.name: self.mean(f.name) for f in dataclasses.fields(StepRecord)
                 if f.type in ("float", "int") and f.name not in ("step", "version")}
        return dict(asdict(self), means=means, rollout_tok_s=self.rollout_tok_s)


@dataclass
class Trainer:
    policy: torch.nn.Module     # fp32, trained
    reference: torch.nn.Module  # fp32, frozen (KL)
    optimizer: torch.optim.Optimizer
    version: int = 0            # weight version of ``policy``


def make_trainer(ctx: Context, version: int) -> Trainer:
    from transformers import AutoModelForCausalLM
    policy = AutoModelForCausalLM.from_pretrained(str(ctx.model_dir), dtype=torch.float32).to(ctx.device)
    reference = AutoModelForCausalLM.from_pretrained(str(ctx.model_dir), dtype=torch.float32).to(ctx.device).eval()
    reference.requires_grad_(False)
    return Trainer(policy, reference, torch.optim.AdamW(policy.parameters(), lr=ctx.lr, weight_decay=0.0), version)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def push(pusher: WeightPusher, trainer: Trainer, device: torch.device) -> PushReport:
    """The trainer's weights to the pool under the trainer's version (CUDA IPC when colocated, else the object
    store; in the engine's dtype); in-flight turns continue on them with their KV recomputed."""
    sync_device(device)
    return pusher.push(list(trainer.policy.named_parameters()), trainer.version, mode="keep", kv="recompute")


class InFlight:
    """One step's episodes on the pool, collected on a thread as they finish, so the time the last one finished
    is known even when the trainer only comes for them later (async)."""

    def __init__(self, pool: Any, ctx: Context, step: int) -> None:
        self.submitted = time.perf_counter()
        self.refs = pool.run_episodes_refs(ctx.env, ctx.env_kwargs(step), ctx.params, ctx.max_turns)
        self.trajs: list[Optional[Trajectory]] = [None] * len(self.refs)
        self.finished = 0.0
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._collect, args=(pool,), name=f"collect-{step}", daemon=True)
        self._thread.start()

    def _collect(self, pool: Any) -> None:
        try:
            for i, traj in pool.as_completed(self.refs):
                self.trajs[i] = traj
        except BaseException as e:  # noqa: BLE001 - re-raised in the trainer's thread by wait()
            self.error = e
        self.finished = time.perf_counter()

    def wait(self) -> list[Trajectory]:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.trajs  # type: ignore[return-value]


def train(ctx: Context, trainer: Trainer, trajs: list[Trajectory], cfg: PPOStepConfig) -> tuple[TrainStats, float]:
    advantages = group_advantages([t.reward or 0.0 for t in trajs], ctx.group_size)
    sync_device(ctx.device)
    t0 = time.perf_counter()
    stats = train_step(trainer.policy, trainer.reference, trainer.optimizer, None, trajs, advantages, cfg,
                       ctx.pad_id, ctx.device, trainer.version)
    sync_device(ctx.device)
    return stats, time.perf_counter() - t0


def record(step: int, trajs: list[Trajectory], trainer_version: int, stats: TrainStats,
           pushed: Optional[PushReport], *, rollout_s: float, rollout_wait_s: float, train_s: float, step_s: float,
           sleep_wake_s: float = 0.0, sleep_freed_bytes: int = 0) -> StepRecord:
    """One step's figures; ``pushed`` None: no weight sync (the baseline samples with the trainer itself)."""
    versions = torch.tensor([v for t in trajs for v in t.versions], dtype=torch.long)
    mask = torch.tensor([m for t in trajs for m in t.loss_mask], dtype=torch.long)
    stale = staleness(versions, mask, trainer_version)
    model_tokens = sum(t.num_model_tokens for t in trajs)
    return StepRecord(step=step, version=trainer_version, rollout_s=rollout_s, rollout_wait_s=rollout_wait_s,
                      train_s=train_s, weight_sync_s=pushed.seconds if pushed else 0.0,
                      sync_pack_s=pushed.pack_seconds if pushed else 0.0,
                      sync_apply_s=pushed.engine_seconds if pushed else 0.0, sleep_wake_s=sleep_wake_s,
                      sleep_freed_bytes=sleep_freed_bytes, step_s=step_s, episodes=len(trajs),
                      model_tokens=model_tokens, env_tokens=int(mask.numel()) - model_tokens,
                      prefill_tokens=sum(int(t.metrics.get("num_prefill_tokens", 0)) for t in trajs),
                      turns_mean=sum(t.turns for t in trajs) / len(trajs),
                      reward_mean=sum(t.reward or 0.0 for t in trajs) / len(trajs),
                      staleness_max=stale.max, staleness_mean=stale.mean,
                      ratio_dev=stats.first_epoch_ratio_abs_dev,
                      sync_transport=pushed.transport if pushed else "none (same process)",
                      sync_bytes=pushed.bytes if pushed else 0)


def run_sync(ctx: Context, pool: Any, pusher: WeightPusher, trainer: Trainer) -> Iterator[StepRecord]:
    """Submit, collect, sleep the engine (its KV cache goes back to the device), train, wake it, push."""
    for step in range(1 + ctx.steps):
        t0 = time.perf_counter()
        flight = InFlight(pool, ctx, step)
        trajs = flight.wait()
        t1 = time.perf_counter()
        freed = sum(int(r["freed_bytes"]) for r in asyncio.run(pool.sleep(1)))
        sleep_s = time.perf_counter() - t1
        stats, train_s = train(ctx, trainer, trajs, ctx.ppo)
        t2 = time.perf_counter()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()    # what the trainer freed goes back to the device for the engine's KV
        asyncio.run(pool.wake_up())
        wake_s = time.perf_counter() - t2
        trainer.version += 1
        pushed = push(pusher, trainer, ctx.device)
        yield record(step, trajs, trainer.version - 1, stats, pushed, rollout_s=flight.finished - flight.submitted,
                     rollout_wait_s=t1 - t0, train_s=train_s, step_s=time.perf_counter() - t0,
                     sleep_wake_s=sleep_s + wake_s, sleep_freed_bytes=freed)


def run_async(ctx: Context, pool: Any, pusher: WeightPusher, trainer: Trainer) -> Iterator[StepRecord]:
    """Step k+1's episodes go out as soon as step k's are in, and run while step k trains and pushes (the
    push lands mid-episode: those turns continue on the new weights, KV recomputed), so every model token is
    at most one version stale. The last timed step trains beside rollouts too (one more step's, drained after)."""
    cfg = dataclasses.replace(ctx.ppo, tis_cap=ctx.tis_cap)
    flight = InFlight(pool, ctx, 0)
    for step in range(1 + ctx.steps):
        t0 = time.perf_counter()
        trajs = flight.wait()
        t1 = time.perf_counter()
        done, flight = flight, InFlight(pool, ctx, step + 1)
        stats, train_s = train(ctx, trainer, trajs, cfg)
        trainer.version += 1
        pushed = push(pusher, trainer, ctx.device)
        yield record(step, trajs, trainer.version - 1, stats, pushed, rollout_s=done.finished - done.submitted,
                     rollout_wait_s=t1 - t0, train_s=train_s, step_s=time.perf_counter() - t0)
    flight.wait()


def run_hf(ctx: Context, trainer: Trainer) -> Iterator[StepRecord]:
    """The episodes in-process with ``generate``, then the same train_step; the sampler is the trainer."""
    for step in range(1 + ctx.steps):
        sync_device(ctx.device)
        t0 = time.perf_counter()
        with ctx.ppo.autocast(ctx.device):      # the trainer's precision samples too
            trajs = run_hf_episodes(trainer.policy, ctx.tokenizer, ctx.env, ctx.env_kwargs(step), ctx.hf,
                                    trainer.version)
        sync_device(ctx.device)
        t1 = time.perf_counter()
        stats, train_s = train(ctx, trainer, trajs, ctx.ppo)
        trainer.version += 1
        yield record(step, trajs, trainer.version - 1, stats, None, rollout_s=t1 - t0, rollout_wait_s=t1 - t0,
                     train_s=train_s, step_s=time.perf_counter() - t0)


def _log(key: str, rec: StepRecord) -> None:
    logger.info("%s step %d%s: rollout %.2f s (waited %.2f), train %.2f s, weight sync %.2f s, sleep+wake %.2f s, "
                "step %.2f s | %d model tokens, %.2f turns/episode, reward %.3f, staleness max %d | epoch-0 "
                "|ratio-1| %s", key, rec.step, " (warm-up)" if rec.step == 0 else "", rec.rollout_s,
                rec.rollout_wait_s, rec.train_s, rec.weight_sync_s, rec.sleep_wake_s, rec.step_s, rec.model_tokens,
                rec.turns_mean, rec.reward_mean, rec.staleness_max,
                "n/a" if rec.ratio_dev is None else f"{rec.ratio_dev:.2e}")


def run_variant(key: str, ctx: Context, pool: Any) -> VariantResult:
    """One variant from a fresh trainer; ours first pushes its starting weights (untimed) so the engine
    samples with exactly the trainer's weights at the trainer's version."""
    trainer = make_trainer(ctx, version=0 if pool is None else pool.version + 1)
    pusher = None if key == "hf" else WeightPusher(pool, device=ctx.device)
    try:
        if pusher is None:
            steps = run_hf(ctx, trainer)
        else:
            push(pusher, trainer, ctx.device)
            steps = (run_sync if key == "sync" else run_async)(ctx, pool, pusher, trainer)
        records = []
        for rec in steps:       # the generator runs the steps: step 0 is the warm-up
            _log(key, rec)
            records.append(rec)
    finally:
        if pusher is not None:
            pusher.close()
    return VariantResult(key, VARIANTS[key], warmup=records[0], steps=records[1:])

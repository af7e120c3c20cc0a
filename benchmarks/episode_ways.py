"""The four ways benchmarks/episode_overhead.py runs one workload: each builds its engine (and what hosts it) once,
runs the workload as often as asked, and reports a ``Run`` per time; the engine-side figures come from
benchmarks/step_log.py (inside the Ray worker for the pool way, reached through ``ActorHandle.__ray_call__``)."""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from benchmarks.step_log import StepLog, instrument, uninstrument
from engine import EngineConfig, LLMEngine, SamplingParams

SAMPLED_THREADS = ["rollout", "MainThread", "asyncio", "ThreadPoolExecutor"]   # thread-name prefixes reported


@dataclass(frozen=True)
class Workload:
    env: str                                    # a registered environment (rollout.envs)
    env_kwargs: list[dict[str, Any]]            # one per episode
    prompts: list[list[int]]                    # each episode's reset(): the engine way's prompts
    params: SamplingParams                      # one model turn per episode


@dataclass
class Run:
    """One timed pass of one way."""
    wall_s: float                               # submission to the last result
    cpu_s: float                                # CPU time of the process running the engine (all its threads)
    steps: dict[str, Any]                       # StepLog.summary
    token_ids: list[list[int]]                  # per episode, in submission order
    logprobs: list[list[float]]


def _run(t0: float, done: float, log: StepLog, n: int, token_ids: list, logprobs: list) -> Run:
    return Run(done - t0, log.cpu_s, log.summary(t0, done, n), [list(t) for t in token_ids],
               [list(lp) for lp in logprobs])


@contextlib.contextmanager
def _sampling(interval_s: float, out: list) -> Iterator[None]:
    """Thread-sample this process while inside (``interval_s`` > 0); the report lands in ``out``."""
    if not interval_s:
        yield
        return
    from benchmarks.thread_sampler import ThreadSampler
    sampler = ThreadSampler(interval_s).start()
    try:
        yield
    finally:
        out.append(sampler.stop().report(threads=SAMPLED_THREADS))


class EngineWay:
    """``LLMEngine.generate`` on every prompt: the engine's own step loop, the baseline."""
    key = "engine"

    def __init__(self, cfg: EngineConfig, **_: Any) -> None:
        self.engine = LLMEngine(cfg)
        self.cuda = cfg.device.startswith("cuda")

    def run(self, w: Workload, params: SamplingParams, sample_s: float = 0.0) -> tuple[Run, Optional[str]]:
        report: list = []
        if self.cuda:
            import torch
            torch.cuda.synchronize()
        log = instrument(self.engine)
        try:
            with _sampling(sample_s, report):
                t0 = time.monotonic()
                cs = self.engine.generate(w.prompts, params)
                done = time.monotonic()
        finally:
            uninstrument(self.engine)
        return _run(t0, done, log.stop(), len(cs), [c.token_ids for c in cs], [c.logprobs for c in cs]), \
            (report or [None])[0]

    def close(self) -> None:
        del self.engine


class LoopWay:
    """``EngineLoop.run_episode`` for every episode, in this process: the loop thread, the episodes' callbacks and
    the env thread pool, without the actor or Ray."""
    key = "loop"

    def __init__(self, cfg: EngineConfig, **_: Any) -> None:
        from rollout.engine_loop import EngineLoop
        self.loop = EngineLoop(cfg)

    def _episodes(self, w: Workload, params: SamplingParams) -> list:
        return [f.result() for f in [self.loop.run_episode(w.env, kw, params, 1) for kw in w.env_kwargs]]

    def run(self, w: Workload, params: SamplingParams, sample_s: float = 0.0) -> tuple[Run, Optional[str]]:
        report: list = []
        log = instrument(self.loop.engine)       # NOTE: set while the loop thread is idle between runs
        try:
            with _sampling(sample_s, report):
                t0 = time.monotonic()
                trajs = self._episodes(w, params)
                done = time.monotonic()
        finally:
            uninstrument(self.loop.engine)
        return _run(t0, done, log.stop(), len(trajs), [t.token_ids for t in trajs], [t.logprobs for t in trajs]), \
            (report or [None])[0]

    def close(self) -> None:
        self.loop.shutdown()


class WorkerWay(LoopWay):
    """``RolloutWorker.run_episode`` for every episode, awaited on an asyncio loop in this process: the actor's own
    code (futures wrapped for asyncio, trajectories stamped), without Ray."""
    key = "worker"

    def __init__(self, cfg: EngineConfig, **_: Any) -> None:
        from rollout.worker import RolloutWorker
        self.worker = RolloutWorker(cfg, 0, fast_channel=False)
        self.loop = self.worker.loop

    def _episodes(self, w: Workload, params: SamplingParams) -> list:
        async def every() -> list:
            return await asyncio.gather(*[self.worker.run_episode(w.env, kw, params, 1) for kw in w.env_kwargs])
        return asyncio.run(every())


class PoolWay:
    """``RolloutPool.run_episodes_refs`` on a pool of one worker (a Ray actor), collected with ``as_completed``:
    what benchmarks/rl_step.py's synchronous step does."""
    key = "pool"

    def __init__(self, cfg: EngineConfig, *, worker_cpus: float = 1.0, **_: Any) -> None:
        import ray

        from rollout.pool import RolloutPool
        from rollout.pool_slots import default_runtime_env
        cuda = cfg.device.startswith("cuda")
        self.started_ray = not ray.is_initialized()     # else a caller's Ray (a test session's): left running
        if self.started_ray:
            ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env=default_runtime_env(), **({"num_gpus": 1} if cuda else {"num_cpus": 2}))
        self.pool = RolloutPool(cfg, num_workers=1, num_cpus_per_worker=worker_cpus, start_timeout_s=600)
        # NOTE: the benchmark reaches into the pool for its one actor, to instrument the engine inside it.
        self.handle = self.pool._slots[0].actor.handle

    def run(self, w: Workload, params: SamplingParams, sample_s: float = 0.0) -> tuple[Run, Optional[str]]:
        import ray

        from benchmarks.step_log import worker_start, worker_stop
        ray.get(self.handle.__ray_call__.remote(worker_start, sample_s))
        t0 = time.monotonic()
        refs = self.pool.run_episodes_refs(w.env, w.env_kwargs, params, 1)
        trajs: list = [None] * len(refs)
        for i, traj in self.pool.as_completed(refs):
            trajs[i] = traj
        done = time.monotonic()
        log, report = ray.get(self.handle.__ray_call__.remote(worker_stop))
        return _run(t0, done, log, len(trajs), [t.token_ids for t in trajs], [t.logprobs for t in trajs]), report

    def close(self) -> None:
        import ray
        self.pool.close()
        if self.started_ray:
            ray.shutdown()


WAYS = {way.key: way for way in (EngineWay, LoopWay, WorkerWay, PoolWay)}

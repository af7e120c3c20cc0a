"""Per-step records of an engine, for benchmarks/episode_overhead.py: wraps ``engine.step`` (an instance attribute
shadowing the method, as benchmarks/timing.py does) to stamp every call that ran something. Importable inside a
Ray worker (the benchmark reaches its engine through ``ActorHandle.__ray_call__``), hence its own small module.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class StepRecord:
    start: float       # time.monotonic() (one clock for every process of the machine)
    seconds: float     # inside engine.step
    running: int       # sequences running after the step


@dataclass
class StepLog:
    records: list[StepRecord] = field(default_factory=list)
    cpu_start: float = field(default_factory=time.process_time)   # this process's CPU time (every thread)
    cpu_s: float = 0.0                                              # ... used until ``stop``

    def stop(self) -> "StepLog":
        self.cpu_s = time.process_time() - self.cpu_start
        return self

    def summary(self, submitted: float, done: float, full_batch: int) -> dict[str, Any]:
        """Steps that ran something between ``submitted`` and ``done`` (monotonic stamps): how many, the time
        inside them, how long until the batch first held ``full_batch`` sequences, and the tail after it
        last did."""
        recs = [r for r in self.records if submitted <= r.start <= done]
        full = [r for r in recs if r.running >= full_batch]
        return {"steps": len(recs), "step_s": sum(r.seconds for r in recs),
                "steps_full": len(full),
                "to_full_s": (full[0].start - submitted) if full else None,
                "tail_s": (done - full[-1].start - full[-1].seconds) if full else None}


def instrument(engine: Any) -> StepLog:
    """Record every ``engine.step`` call that ran a step (a call with nothing scheduled is left out)."""
    log = StepLog()
    step, scheduler = engine.step, engine.scheduler

    def timed_step() -> Any:
        steps = scheduler.stats.steps
        t0 = time.monotonic()
        out = step()
        t1 = time.monotonic()
        if scheduler.stats.steps != steps or out:
            log.records.append(StepRecord(t0, t1 - t0, len(scheduler.running)))
        return out
    engine.step = timed_step
    return log


def uninstrument(engine: Any) -> None:
    engine.__dict__.pop("step", None)


# ---------------------------------------------------------------- inside a RolloutWorker actor (__ray_call__)
_WORKER_STATE: dict[str, Any] = {}


def worker_start(worker: Any, sample_interval_s: Optional[float]) -> None:
    """Instrument the worker's engine and (``sample_interval_s``) start a thread sampler in its process."""
    _WORKER_STATE["log"] = instrument(worker.loop.engine)
    _WORKER_STATE["sampler"] = None
    if sample_interval_s:
        from benchmarks.thread_sampler import ThreadSampler
        _WORKER_STATE["sampler"] = ThreadSampler(sample_interval_s).start()


def worker_stop(worker: Any) -> tuple[StepLog, Optional[str]]:
    """The step log and the sampler's report (None without one); the engine's step is restored."""
    uninstrument(worker.loop.engine)
    sampler = _WORKER_STATE.pop("sampler", None)
    report = sampler.stop().report() if sampler is not None else None
    return _WORKER_STATE.pop("log").stop(), report

"""Sleep and wake: give the device memory of an idle engine back (to a colocated trainer), and take it again.

    level 1   the KV cache (and the CUDA graphs' pool) is released; the weights stay
    level 2   the weights are released too (with the float32 head's copies of them, ``fp32_lm_head``); after
              ``wake_up`` they are undefined until a complete ``update_weights`` lands (the engine refuses work
              until then; that update refreshes the copies)

What happens to the engine's work (docs/scheduler.md, "Sleep"):
  - ``sleep`` first finishes what is running (admission paused meanwhile, like ``update_weights(mode="drain")``);
    queued requests and turns stay queued.
  - parked sessions keep their history; their KV goes to the host pool where it fits (restored at their next
    turn), else it is dropped (counted, re-prefilled); the prefix cache is emptied.
  - while asleep, requests and turns are accepted and wait; ``step`` runs nothing, ``has_unfinished`` is False,
    ``update_weights`` and the blocking helpers (``generate``, ``run_turn``) refuse with a clear error.
  - ``wake_up`` allocates the KV cache again (zeros), re-captures the CUDA graphs on the new addresses, and
    resumes admission.
Freed memory is measured with ``torch.cuda.mem_get_info`` on CUDA (the tensors' bytes on CPU).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.kv_cache import allocate_kv_cache

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)
SLEEP_LEVELS = (1, 2)


class EngineAsleep(RuntimeError):
    """The engine is asleep (``sleep``): call ``wake_up`` first."""


@dataclass(frozen=True)
class SleepReport:
    level: int
    freed_bytes: int            # device memory given back (mem_get_info delta on CUDA; tensor bytes on CPU)
    kv_bytes: int               # bytes of the KV cache released
    weight_bytes: int           # bytes of the weights released (level 2), float32 head copies included
    offloaded_sessions: int     # parked sessions whose KV went to the host pool
    dropped_sessions: int       # parked sessions whose KV was dropped (no room on the host)
    seconds: float


@dataclass(frozen=True)
class WakeReport:
    level: int
    taken_bytes: int            # device memory taken again
    graphs_captured: bool
    seconds: float


def _free_device_bytes(engine: "LLMEngine") -> int:
    if engine.device.type != "cuda":
        return 0
    torch.cuda.synchronize(engine.device)
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(engine.device)[0]


def sleep(engine: "LLMEngine", level: int) -> SleepReport:
    if isinstance(level, bool) or level not in SLEEP_LEVELS:
        raise ValueError(f"sleep level must be one of {SLEEP_LEVELS}, got {level!r}")
    if engine.asleep:
        raise EngineAsleep(f"the engine is already asleep (level {engine.asleep})")
    t0 = time.perf_counter()
    sched = engine.scheduler
    engine.drain_running()
    if engine.host_cache is not None:                 # restores still in flight (an aborted turn's) land first
        engine.host_cache.wait_all()
        sched.kv_landed(engine.host_cache.poll())
    stats = sched.stats
    before = (stats.offloaded_sessions, stats.dropped_sessions)
    sched.evacuate()                                  # parked sessions' KV to the host (or dropped)
    output = sched.build_output([])                   # just the copies
    if not output.is_empty:
        engine.runner.launch(output, {})
    if engine.host_cache is not None:
        engine.host_cache.wait_all()
    assert sched.pool.num_in_use == 0, "sleep: device blocks still held after evacuation"
    free_before = _free_device_bytes(engine)
    kv_bytes = sum(c.numel() * c.element_size() for pair in engine.kv_caches for c in pair)
    engine.runner.graphs = None                       # the graphs hold the old KV and their memory pool
    engine.runner.set_kv_caches(None)
    if engine.host_cache is not None:                 # it copies to and from the device KV: let go of it
        engine.host_cache.unbind()
    engine.kv_caches = None
    weight_bytes = 0
    if level == 2:
        head = getattr(engine.model, "fp32_head", None)
        for p in [*engine.updater.params.values(), *(head.buffers() if head is not None else ())]:
            weight_bytes += p.numel() * p.element_size()
            engine._released_params.append((p, tuple(p.shape)))
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        engine.updater.forget_plans()
    free_after = _free_device_bytes(engine)
    freed = free_after - free_before if engine.device.type == "cuda" else kv_bytes + weight_bytes
    engine.asleep = level
    report = SleepReport(level, freed, kv_bytes, weight_bytes, stats.offloaded_sessions - before[0],
                         stats.dropped_sessions - before[1], time.perf_counter() - t0)
    logger.info("engine asleep (level %d): %.2f GB freed (KV %.2f GB, weights %.2f GB) in %.3f s", level,
                freed / 1e9, kv_bytes / 1e9, weight_bytes / 1e9, report.seconds)
    return report


def wake_up(engine: "LLMEngine") -> WakeReport:
    if not engine.asleep:
        raise ValueError("wake_up: the engine is not asleep")
    t0 = time.perf_counter()
    level = engine.asleep
    free_before = _free_device_bytes(engine)
    if level == 2:
        for p, shape in engine._released_params:
            p.data = torch.empty(shape, dtype=p.dtype, device=p.device)
        engine._released_params.clear()
        engine.weights_discarded = True               # undefined until a complete update lands
    mc, cfg = engine.model_config, engine.config
    engine.kv_caches = allocate_kv_cache(mc, engine.scheduler.config.num_blocks, cfg.block_size, engine.dtype,
                                         engine.device)
    engine.runner.set_kv_caches(engine.kv_caches)
    if engine.host_cache is not None:
        engine.host_cache.bind(engine.kv_caches)
    captured = engine.runner.recapture_cuda_graphs()
    engine.asleep = 0
    free_after = _free_device_bytes(engine)
    taken = free_before - free_after if engine.device.type == "cuda" else 0
    report = WakeReport(level, taken, captured, time.perf_counter() - t0)
    logger.info("engine awake (from level %d): %.2f GB taken, CUDA graphs %s, in %.3f s", level, taken / 1e9,
                "re-captured" if captured else "not used", report.seconds)
    return report

"""Sleep and wake: give the device memory of an idle engine back (to a colocated trainer), and take it again.

    level 1   the KV cache is released; the weights stay
    level 2   the weights are released too (with the float32 head's copies of them, ``fp32_lm_head``); after
              ``wake_up`` they are undefined until a complete ``update_weights`` lands (the engine refuses work
              until then; that update refreshes the copies)

How the memory goes and comes back (``EngineConfig.fixed_address_memory``):
  - fixed addresses (CUDA, the default): the KV cache, the weights and the copies live in driver virtual-memory
    regions (``engine.device_memory``). Sleep unmaps their physical memory and keeps the addresses; wake maps
    new memory at the same addresses and zeroes the KV cache. The CUDA graphs (decode and mixed-step) read
    the same addresses, so they are kept: no re-capture. Their memory pools stay allocated while asleep
    (``SleepReport.graph_pool_bytes``: one step's activations per pool).
  - torch allocations (CPU, the option off, or the driver API unavailable: logged at start): sleep drops every
    reference to the tensors and the CUDA graphs with their pools; wake allocates new ones (zeros for the KV
    cache) and re-captures the graphs on the new addresses.
  Either way, while asleep the engine shows nothing of the released memory: ``kv_caches`` is None (the
  model runner's and the host pool's too) and each released parameter is empty; wake gives them back (at
  fixed addresses, the same tensors: nothing a graph reads changed). NOTE: with fixed addresses a kernel
  touching released memory would fault and poison the CUDA context; this is what keeps anything from reaching it.

What happens to the engine's work (docs/scheduler.md, "Sleep"):
  - ``sleep`` first finishes what is running (admission paused meanwhile, like ``update_weights(mode="drain")``);
    queued requests and turns stay queued.
  - parked sessions keep their history; their KV goes to the host pool where it fits (restored at their next
    turn), else it is dropped (counted, re-prefilled); the prefix cache is emptied.
  - while asleep, requests and turns are accepted and wait; ``step`` runs nothing, ``has_unfinished`` is False,
    ``update_weights`` and the blocking helpers (``generate``, ``run_turn``) refuse with a clear error.
  - ``wake_up`` takes the memory again (above) and resumes admission.
Freed memory is measured with ``torch.cuda.mem_get_info`` on CUDA (the tensors' bytes on CPU).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

import torch

from engine.kv_cache import allocate_kv_cache, kv_storage

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
    graph_pool_bytes: Optional[int] = 0   # device memory the kept CUDA graphs' pools hold while asleep (0: no
                                          # graphs kept; None: torch's memory snapshot could not tell)


@dataclass(frozen=True)
class WakeReport:
    level: int
    taken_bytes: int            # device memory taken again
    graphs_captured: bool       # the CUDA graphs were re-captured (memory re-allocated at new addresses)
    seconds: float
    graphs_kept: bool = False   # the CUDA graphs were kept: every address they read was re-mapped where it was
    remapped_bytes: int = 0     # bytes of fixed-address regions mapped again (engine.device_memory)


@dataclass
class _Released:
    """What ``sleep`` took away, for ``wake_up`` to give back."""
    # the KV tensors, at fixed addresses (bound again at wake); None: allocate new ones
    kv: Optional[list] = None
    # (parameter or fp32-head buffer, its data at fixed addresses | its shape: allocate new storage)
    tensors: list[tuple[torch.Tensor, Union[torch.Tensor, tuple[int, ...]]]] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)   # fixed-address regions unmapped, mapped again at wake
    recapture: bool = False     # the CUDA graphs were dropped (something they read is re-allocated)


def _free_device_bytes(engine: "LLMEngine") -> int:
    if engine.device.type != "cuda":
        return 0
    torch.cuda.synchronize(engine.device)
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(engine.device)[0]


def _in_region(engine: "LLMEngine", name: str) -> bool:
    return engine.fixed_memory is not None and name in engine.fixed_memory.regions


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
    released = _Released()
    kv_bytes = sum(c.numel() * c.element_size() for pair in engine.kv_caches for c in pair)
    if _in_region(engine, "kv"):
        released.kv = engine.kv_caches
        released.regions.append("kv")
    else:
        released.recapture = True
    # Hide the KV tensors from everything (at fixed addresses they stay allocated but unmapped; otherwise this
    # drops the last references, so their memory goes).
    engine.runner.set_kv_caches(None)
    if engine.host_cache is not None:                 # it copies to and from the device KV: let go of it
        engine.host_cache.unbind()
    engine.kv_caches = None
    weight_bytes = 0
    if level == 2:
        head = getattr(engine.model, "fp32_head", None)
        for name, tensors in (("weights", list(engine.updater.params.values())),
                              ("fp32 head", list(head.buffers()) if head is not None else [])):
            fixed = _in_region(engine, name)
            for p in tensors:
                weight_bytes += p.numel() * p.element_size()
                released.tensors.append((p, p.data if fixed else tuple(p.shape)))
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            if fixed:
                released.regions.append(name)
            elif tensors:
                released.recapture = True
                if name == "weights":
                    engine.updater.forget_plans()     # its bucket plans point at the old storage
    if released.recapture:
        engine.runner.drop_cuda_graphs()              # they read the old addresses; their pools go too
    if released.regions:
        engine.fixed_memory.release(released.regions)
    free_after = _free_device_bytes(engine)
    freed = free_after - free_before if engine.device.type == "cuda" else kv_bytes + weight_bytes
    pool_bytes = engine.runner.graph_pool_bytes() if engine.device.type == "cuda" else 0
    engine.asleep = level
    engine._released = released
    report = SleepReport(level, freed, kv_bytes, weight_bytes, stats.offloaded_sessions - before[0],
                         stats.dropped_sessions - before[1], time.perf_counter() - t0, pool_bytes)
    if released.recapture:
        graphs = "CUDA graphs dropped (re-captured at wake)"
    elif engine.runner.graphs is None:
        graphs = "no CUDA graphs"
    else:
        graphs = "CUDA graphs kept, their pools " + ("unmeasured" if pool_bytes is None else f"{pool_bytes / 1e9:.2f} GB")
    logger.info("engine asleep (level %d): %.2f GB freed (KV %.2f GB, weights %.2f GB) in %.3f s; %s", level,
                freed / 1e9, kv_bytes / 1e9, weight_bytes / 1e9, report.seconds, graphs)
    return report


def wake_up(engine: "LLMEngine") -> WakeReport:
    if not engine.asleep:
        raise ValueError("wake_up: the engine is not asleep")
    t0 = time.perf_counter()
    level = engine.asleep
    released: _Released = engine._released
    free_before = _free_device_bytes(engine)
    # all regions or none (a failure, e.g. memory the trainer still holds, leaves the engine asleep: retry)
    remapped = engine.fixed_memory.remap(released.regions) if released.regions else 0
    for p, data in released.tensors:
        p.data = data if isinstance(data, torch.Tensor) else torch.empty(data, dtype=p.dtype, device=p.device)
    if level == 2:
        engine.weights_discarded = True               # undefined until a complete update lands
    if released.kv is not None:
        kv = released.kv                              # the same tensors, the same addresses: zero them
        storage = kv_storage(kv)
        assert storage is not None, "fixed-address KV caches are views of one storage"
        storage.zero_()
    else:
        mc, cfg = engine.model_config, engine.config
        kv = allocate_kv_cache(mc, engine.scheduler.config.num_blocks, cfg.block_size, engine.dtype, engine.device)
    engine.kv_caches = kv
    engine.runner.set_kv_caches(kv)
    if engine.host_cache is not None:
        engine.host_cache.bind(kv)
    captured = engine.runner.recapture_cuda_graphs() if released.recapture else False
    kept = not released.recapture and engine.runner.graphs is not None
    engine.asleep = 0
    engine._released = None
    free_after = _free_device_bytes(engine)
    taken = free_before - free_after if engine.device.type == "cuda" else 0
    report = WakeReport(level, taken, captured, time.perf_counter() - t0, kept, remapped)
    logger.info("engine awake (from level %d): %.2f GB taken (%.2f GB re-mapped at the same addresses), CUDA graphs "
                "%s, in %.3f s", level, taken / 1e9, remapped / 1e9,
                "kept" if kept else "re-captured" if captured else "not used", report.seconds)
    return report

"""``LLMEngine.stats()``: the scheduler's counters and the pools' gauges in one dict (docs/scheduler.md)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine


def engine_stats(engine: "LLMEngine") -> dict:
    sched = engine.scheduler
    s, pool, block_bytes = sched.stats, sched.pool, engine.kv_block_bytes
    return {
        "steps": s.steps,
        "prefill_tokens": s.prefill_tokens,
        "cached_prompt_tokens": s.cached_prompt_tokens,
        "decode_tokens": s.decode_tokens,
        "preemptions": s.preemptions,
        "finished_requests": s.finished_requests,
        "aborted_requests": s.aborted_requests,
        "num_running": len(sched.running),
        "num_waiting": len(sched.waiting),
        "num_free_blocks": sched.kv.headroom,       # what new admissions may claim (idle sessions' blocks count)
        "num_held_blocks": pool.num_in_use,         # blocks some sequence or parked session holds
        "num_total_blocks": pool.num_blocks,
        "num_reserved_blocks": sched.kv.num_reserved,
        "num_reclaimable_blocks": pool.num_reclaimable,
        "num_cached_blocks": pool.num_cached_blocks,
        "prefix_cache_evictions": pool.num_evictions,
        "weight_version": engine.weight_version,
        "weights_inconsistent": engine.updater.inconsistent,
        "recomputed_tokens": s.recomputed_tokens,
        "finished_turns": s.finished_turns,
        "open_sessions": len(sched.sessions),
        "offloaded_blocks": s.offloaded_blocks,
        "offloaded_bytes": s.offloaded_blocks * block_bytes,
        "offloaded_sessions": s.offloaded_sessions,
        "restored_blocks": s.restored_blocks,
        "restored_bytes": s.restored_blocks * block_bytes,
        "restored_sessions": s.restored_sessions,
        "dropped_sessions": s.dropped_sessions,
        "dropped_tokens": s.dropped_tokens,
        "expired_sessions": s.expired_sessions,
        "num_host_blocks": sched.host.num_blocks,
        "num_free_host_blocks": sched.host.num_free,
        "swapped_out": s.swapped_out,
        "peak_running": s.peak_running,
        "host_copy_bytes": engine.host_cache.bytes_moved if engine.host_cache is not None else 0,
        "mean_queue_wait_s": s.queue_wait_s / max(1, s.admissions),
        "steps_ahead": s.steps_ahead,
    }

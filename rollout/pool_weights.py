"""The pool's weight state and its version barrier: one update applied on every worker, one outcome.

Owned by the pool's event loop. ``lock`` serializes updates and restarts (a restarted worker loads a
consistent source, never one that is half-way through being replaced).

Outcomes of one update at version v, applied concurrently on every live worker:
- every worker applied it (workers that died meanwhile restart on it): the pool moves to v;
- every worker rejected it: the engines' apply is atomic, so the old weights keep serving everywhere and
  UPDATE_FAILED is raised;
- some applied, some rejected: no rollback (a version never goes backwards); the pool is *inconsistent*
  and refuses new work (UNAVAILABLE) until a later update lands on every worker, so two versions are
  never mixed silently.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Optional

from rollout.backend import ErrorCode, RolloutError
from rollout.pool_slots import Slot, to_rollout_error
from rollout.worker import WeightSource

# Applies one update on one worker: (slot, source) -> the worker's report.
ApplyOne = Callable[[Slot, WeightSource], Awaitable[dict[str, Any]]]


class WeightState:
    def __init__(self) -> None:
        self.version = 0
        self.source: Optional[WeightSource] = None    # the last complete update (None: the model's own)
        self.inconsistent = False
        self.lock = asyncio.Lock()

    def next_version(self, version: Optional[int]) -> int:
        """``version`` checked (an int above the pool's), or the pool's + 1."""
        if version is None:
            return self.version + 1
        if isinstance(version, bool) or not isinstance(version, int) or version <= self.version:
            raise RolloutError(ErrorCode.BAD_REQUEST,
                               f"version must be an int greater than the pool's {self.version}, got {version!r}")
        return version

    async def update(self, slots: list[Slot], source: WeightSource, apply_one: ApplyOne) -> dict[str, Any]:
        """Apply ``source`` on ``slots`` (call with ``lock`` held) and settle the outcome (module docstring)."""
        version = source.version
        start = time.perf_counter()
        results = await asyncio.gather(*(apply_one(s, source) for s in slots), return_exceptions=True)
        applied = [r for r in results if not isinstance(r, BaseException)]
        died = [r for r in results if isinstance(r, RolloutError) and r.code is ErrorCode.WORKER_DIED]
        failed = [(s.index, r) for s, r in zip(slots, results) if isinstance(r, BaseException) and r not in died]
        if not failed:
            # Workers that died mid-update restart on the new source (they wait for this lock).
            self.version, self.source, self.inconsistent = version, source, False
            return {"version": version, "seconds": time.perf_counter() - start,
                    "num_bytes": max((r["num_bytes"] for r in applied), default=0),
                    "num_workers": len(applied), "restarted_workers": len(died)}
        detail = "; ".join(f"worker {i}: {to_rollout_error(r, i).message}" for i, r in failed)
        if applied:
            self.version, self.inconsistent = version, True
            raise RolloutError(ErrorCode.UPDATE_FAILED,
                               f"{len(applied)} of {len(slots)} workers applied version {version}, the others "
                               f"failed ({detail}); the pool refuses work until a complete update_weights")
        raise RolloutError(ErrorCode.UPDATE_FAILED, f"every worker rejected version {version} and keeps "
                                                    f"serving version {self.version}: {detail}")

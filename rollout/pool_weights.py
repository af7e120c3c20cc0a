"""The pool's weight state and its version barrier: one update applied on every worker, one outcome.

Owned by the pool's event loop. ``lock`` serializes updates, group formation and restarts (a restarted
worker loads a consistent source, never one that is half-way through being replaced).

Outcomes of one update at version v, applied concurrently on every live worker. *Serving* workers are
the ones routing uses; a worker *awaiting weights* (restarted, but unable to reload the pool's weights)
takes part too, and serves again once an update lands on it:
- every serving worker applied it (workers that died meanwhile restart on it): the pool moves to v. If the
  workers that applied it read different bytes (their content digests differ: the source changed while
  they read it), v is a silent mix and the pool is marked inconsistent instead;
- every serving worker rejected it: the engines' apply is atomic, so the old weights keep serving
  everywhere and UPDATE_FAILED is raised;
- some applied, some rejected: no rollback (a version never goes backwards); the pool is *inconsistent*
  and refuses new work (UNAVAILABLE) until a later update lands on every worker, so two versions are
  never mixed silently.

The last complete source is kept to reload a restarted worker: a loader name + kwargs with the content
digest the workers read (the replay must match it, or the worker is held out of routing: the path may
have been overwritten since), or the object refs of an in-memory update (immutable: nothing to check).
A source that cannot be replayed at all (a broadcast through the weight-sync group) holds the restarted
worker out until the next update.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Awaitable, Callable, Optional

from engine.engine_update import KV_POLICIES, UPDATE_MODES
from rollout.backend import ErrorCode, RolloutError
from rollout.pool_slots import Slot, to_rollout_error
from rollout.worker import WeightSource

def check_update_policy(mode: str, kv: str) -> None:
    """BAD_REQUEST unless ``mode`` / ``kv`` are the engine's (checked here when a refusal must happen before any
    worker reads the update)."""
    if mode not in UPDATE_MODES:
        raise RolloutError(ErrorCode.BAD_REQUEST, f"mode must be one of {UPDATE_MODES}, got {mode!r}")
    if kv not in KV_POLICIES:
        raise RolloutError(ErrorCode.BAD_REQUEST, f"kv must be one of {KV_POLICIES}, got {kv!r}")


# Applies one update on one worker: (slot, source) -> the worker's report ({"version", "num_bytes", "digest", ...}).
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
        serving = {s for s in slots if s.ready.is_set()}
        start, called = time.perf_counter(), time.monotonic()
        results = await asyncio.gather(*(apply_one(s, source) for s in slots), return_exceptions=True)
        gathered = time.monotonic()
        applied = [(s, r) for s, r in zip(slots, results) if not isinstance(r, BaseException)]
        died = [s for s, r in zip(slots, results) if isinstance(r, RolloutError) and r.code is ErrorCode.WORKER_DIED]
        failed = [(s, to_rollout_error(r, s.index)) for s, r in zip(slots, results)
                  if isinstance(r, BaseException) and s not in died]
        rejected = [(s, e) for s, e in failed if s in serving]
        if not rejected and (applied or died):
            digests = {r.get("digest") for _, r in applied}
            if len(digests) > 1:
                self.version, self.inconsistent = version, True
                raise RolloutError(ErrorCode.UPDATE_FAILED,
                                   f"the workers read different bytes for version {version} (content digests "
                                   f"{sorted(d or '-' for d in digests)}): the source changed while they read "
                                   f"it; the pool refuses work until a complete update_weights")
            digest = next(iter(digests), None)
            self.version, self.inconsistent = version, False
            self.source = dataclasses.replace(source, digest=digest) if digest else source
            for s, _ in applied:
                s.serve()              # a worker that was awaiting weights holds them now
            for s, e in failed:        # awaiting workers only (no serving one failed): they stay out
                s.hold(f"version {version} failed on it: {e.message}")
            slowest = max((r for _, r in applied), key=lambda r: r.get("seconds", 0.0), default={})
            return {"version": version, "seconds": time.perf_counter() - start,
                    "engine_seconds": slowest.get("seconds", 0.0),
                    # time.monotonic() stamps of the slowest worker's apply between the pool's call and its
                    # gather (rollout.weight_push.PushReport.stages splits them)
                    "timeline": {**slowest.get("timeline", {}), "pool_called": called, "pool_gathered": gathered},
                    "num_bytes": max((r["num_bytes"] for _, r in applied), default=0),
                    "num_workers": len(applied), "restarted_workers": len(died),
                    # how the call reached the workers that applied it: "fast" (rollout.fast_channel), "ray"
                    "channels": sorted({r.get("channel", "ray") for _, r in applied})}
        for s, _ in applied:
            if s not in serving:   # it holds v, which does not serve: it stays out
                s.hold(f"holds version {version}, which the other workers did not apply")
        detail = "; ".join(f"worker {s.index}: {e.message}" for s, e in failed)
        if any(s in serving for s, _ in applied):
            self.version, self.inconsistent = version, True
            raise RolloutError(ErrorCode.UPDATE_FAILED,
                               f"{len(applied)} of {len(slots)} workers applied version {version}, the others "
                               f"failed ({detail}); the pool refuses work until a complete update_weights")
        raise RolloutError(ErrorCode.UPDATE_FAILED, f"every worker rejected version {version} and keeps "
                                                    f"serving version {self.version}: {detail}")

    async def reload(self, slot: Slot, timeout_s: float) -> Optional[str]:
        """Bring ``slot``'s fresh actor to the pool's weights (call with ``lock`` held). None when it holds them;
        else why it cannot (a source that cannot be replayed, or no longer matches its digest): the caller
        holds the worker out of routing until an update lands on it. Any other failure raises."""
        source = self.source
        if source is None:
            return None                              # the model's own weights: a fresh actor has them
        if not source.replayable:
            return (f"version {source.version} came through {source.transport}, which cannot be replayed; "
                    f"it serves again after the next update"
                    + (" (form a new group to include it)" if source.ipc is None else ""))
        try:
            await asyncio.wait_for(slot.actor.handle.load_state.remote(source), timeout_s)
        except Exception as e:  # noqa: BLE001
            err = to_rollout_error(e, slot.index)
            if err.code is not ErrorCode.UPDATE_FAILED:
                raise err from None
            return f"cannot reload version {source.version}: {err.message}"
        return None

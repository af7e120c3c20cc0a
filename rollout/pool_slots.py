"""A ``RolloutPool``'s worker slots and the helpers around its Ray calls.

A *slot* is one bundle of the pool's placement group, i.e. one worker position (``index``); an *incarnation*
is one actor in that slot. A restart puts a new incarnation in the same slot, so anything that must not
outlive an actor (a call waiting on it, a weight-sync group it joined) holds the incarnation, not the slot.
All of it is owned by the pool's event loop (one thread): no locks.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from rollout.backend import ErrorCode, RolloutError
from rollout.worker import WorkerError


def to_rollout_error(exc: BaseException, worker: Optional[int] = None) -> RolloutError:
    """Ray's wrapping of a worker's error, or a dead actor, as the ``RolloutError`` a caller sees."""
    import ray.exceptions as rex
    if isinstance(exc, RolloutError):
        return exc
    if isinstance(exc, rex.RayActorError):
        return RolloutError(ErrorCode.WORKER_DIED, f"worker {worker} died: {type(exc).__name__}")
    cause = getattr(exc, "cause", exc)
    if isinstance(cause, WorkerError):
        return cause.to_rollout_error()
    return RolloutError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def as_completed(refs: list, timeout_s: Optional[float] = None, *,
                 return_exceptions: bool = False) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, result)`` for ``refs`` in completion order (a ``ray.wait`` loop). A failed ref raises
    its ``RolloutError`` (or yields it with ``return_exceptions=True``); ``timeout_s`` bounds the whole wait."""
    import ray
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
        if not ready:
            raise RolloutError(ErrorCode.UNAVAILABLE, f"{len(pending)} results not ready after {timeout_s} s")
        if pending:
            # Everything else that is ready too, in the same pass: results tend to finish together (a batch of
            # episodes in the same engine step), and one ray.wait per result costs O(pending) each.
            more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            ready += more
        try:
            values = ray.get(ready)          # one call for all of them; a failed one fails it: then one by one
        except Exception:  # noqa: BLE001
            values = None
        for k, ref in enumerate(ready):
            try:
                yield index[ref], values[k] if values is not None else ray.get(ref)
            except Exception as e:  # noqa: BLE001
                err = to_rollout_error(e)
                if not return_exceptions:
                    raise err from None
                yield index[ref], err


def default_runtime_env() -> dict[str, Any]:
    """Workers import this repository's packages: put its root on their PYTHONPATH (harmless when the
    package is installed). On a real cluster pass ``runtime_env`` (e.g. a ``working_dir``) instead."""
    import os
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


@dataclass(eq=False)
class Incarnation:
    """One actor of a worker slot; a restart makes a new one."""
    handle: Any
    death: asyncio.Future                      # resolved when this actor is found dead
    inflight: int = 0                          # calls waiting on it (routing load)
    watch: Any = None                          # the ref of its never-returning watch() call (fails on death)
    info: dict = field(default_factory=dict)   # what its ready() returned (GPU UUID, fast-channel address, ...)


@dataclass(eq=False)
class Slot:
    """States: *serving* (``ready`` set: routing picks it), *restarting* (``restarting`` is the task bringing a
    new actor up), *awaiting weights* (a live actor that does not hold the pool's weights: never routed to,
    included in the next update, serving again once one lands on it), *failed* (no actor could be started)."""
    index: int
    actor: Incarnation
    ready: asyncio.Event                       # set while the worker takes requests (routing picks only these)
    open_sessions: int = 0
    sessions_opened: int = 0                   # ever (tests compare with the worker's resumed-turn counters)
    turns_routed: int = 0
    restarts: int = 0
    failed: Optional[str] = None               # a restart that could not bring it back
    awaiting_weights: Optional[str] = None     # why this live worker is held out of routing
    restarting: Optional[asyncio.Task] = None
    load: dict[str, int] = field(default_factory=dict)

    def key(self, extra: int = 0) -> tuple:
        """Routing order, least loaded first; ``extra``: requests being routed to it that are not counted yet."""
        return (self.actor.inflight + self.open_sessions + extra, -self.load.get("num_free_blocks", 0), self.index)

    @property
    def live(self) -> bool:
        """Its actor is up (serving or awaiting weights): it can be called, and takes part in updates."""
        return not self.actor.death.done() and not self.failed

    def serve(self) -> None:
        self.awaiting_weights = None
        self.ready.set()

    def hold(self, reason: str) -> None:
        self.awaiting_weights = reason
        self.ready.clear()


def gpus_per_worker(num_gpus: Optional[float], device: str) -> float:
    """GPUs in each worker's bundle: 1 by default on CUDA, 0 on CPU; a fraction in (0, 1] shares a GPU (with the
    trainer or other workers)."""
    cuda = device.startswith("cuda")
    if num_gpus is None:
        return 1.0 if cuda else 0.0
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float)):
        raise ValueError(f"num_gpus_per_worker must be a number, got {type(num_gpus).__name__}")
    if not cuda:
        raise ValueError(f"num_gpus_per_worker={num_gpus!r} needs a CUDA engine (EngineConfig.device is {device!r})")
    if not 0 < num_gpus <= 1:
        raise ValueError(f"num_gpus_per_worker must be in (0, 1] (one engine uses one GPU; a fraction shares it), "
                         f"got {num_gpus!r}")
    return float(num_gpus)

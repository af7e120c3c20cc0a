"""``Supervisor``: the life of a pool's workers — actors spawned into their bundles, calls that fail the moment
their worker dies, deaths noticed (by a call, a ref handed out, or the watch every actor keeps open), restarts.

Noticing a death: a call that sees ``RayActorError`` marks its worker dead, and so does the failure of the
one ``watch()`` call kept open on every actor, so a worker that dies idle is noticed before anything is
routed to it (within Ray's failure detection: about a second for a killed process, the GCS heartbeat timeout
for a lost node). Then every call still waiting on that worker fails at once with WORKER_DIED (each waits on
its result *or* the worker's death), the pool forgets what lived there (``on_death``), and a new actor starts
in the same bundle. Under the weight lock it reloads the pool's weights (``WeightState.reload``); a worker that
cannot (a source that cannot be replayed or no longer matches its digest) is held out of routing until an
update lands on it; one whose actor does not come up is *failed* for good.

Streams (``stream``): a worker's streaming-generator method, item by item, failing the same way the moment its worker
dies; closing it early cancels the worker's task.

Owned by the pool's event loop, like the slots it manages.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import AsyncIterator
from typing import Any, Callable

from rollout.backend import ErrorCode, RolloutError
from rollout.pool_slots import Incarnation, Slot, to_rollout_error
from rollout.pool_weights import WeightState

logger = logging.getLogger(__name__)


_END_OF_STREAM = object()


async def _next_item(gen: Any) -> Any:
    """The next item of a Ray ObjectRefGenerator (its value, not its ref), or _END_OF_STREAM."""
    try:
        ref = await gen.__anext__()
    except StopAsyncIteration:
        return _END_OF_STREAM
    return await ref


def _kill(handle: Any) -> None:
    import ray
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


class Supervisor:
    def __init__(self, loop: asyncio.AbstractEventLoop, spawn: Callable[[int], Any], weights: WeightState,
                 start_timeout_s: float, on_death: Callable[[Slot, Incarnation], None]) -> None:
        self._loop = loop
        self._spawn = spawn                  # slot index -> a new actor handle in that slot's bundle
        self._weights = weights
        self._start_timeout_s = start_timeout_s
        self._on_death = on_death            # the pool's bookkeeping (sessions, weight-sync group) for a death
        self.slots: list[Slot] = []
        self.deaths = 0
        self.closing = False

    def _incarnation(self, index: int) -> Incarnation:
        return Incarnation(self._spawn(index), self._loop.create_future())

    async def start(self, num_workers: int) -> None:
        """Start every worker; each one's ready() is kept on its incarnation (``Incarnation.info``)."""
        self.slots = [Slot(i, self._incarnation(i), asyncio.Event()) for i in range(num_workers)]
        infos = await asyncio.gather(*(asyncio.wait_for(s.actor.handle.ready.remote(), self._start_timeout_s)
                                       for s in self.slots))
        for s, info in zip(self.slots, infos):
            s.actor.info = info
            self._watch(s, s.actor)
            s.ready.set()

    async def call(self, slot: Slot, method: str, *args: Any) -> Any:
        """Call a worker method; its result, or RolloutError — WORKER_DIED as soon as the worker is found dead."""
        actor = slot.actor
        if actor.death.done() or slot.failed:
            raise RolloutError(ErrorCode.WORKER_DIED, f"worker {slot.index} is down")
        ref = getattr(actor.handle, method).remote(*args)
        result = asyncio.wrap_future(ref.future())
        actor.inflight += 1
        try:
            await asyncio.wait({result, actor.death}, return_when=asyncio.FIRST_COMPLETED)
            if not result.done():
                if actor.death.cancelled():
                    raise RolloutError(ErrorCode.UNAVAILABLE, "the pool shut down with this request in flight")
                raise RolloutError(ErrorCode.WORKER_DIED, f"worker {slot.index} died with this request in flight")
            exc = result.exception()
            if exc is None:
                return result.result()
            err = to_rollout_error(exc, slot.index)
            if err.code is ErrorCode.WORKER_DIED:
                self.worker_died(slot, actor)
            raise err from None
        finally:
            actor.inflight -= 1
            if not result.done():
                # Cancelling the wrapper alone leaves the actor task running (Ray does not cancel it):
                # cancel the task itself, which aborts the request in the worker's engine.
                result.cancel()
                try:
                    import ray
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - already finished or the worker is gone
                    pass

    async def stream(self, slot: Slot, method: str, *args: Any) -> AsyncIterator[Any]:
        """Call a worker's streaming-generator method (``num_returns="streaming"``); its items as they come, or
        RolloutError — WORKER_DIED as soon as the worker is found dead. Closing the iterator before the end
        cancels the worker's task (``ray.cancel``: the worker's generator is cancelled and aborts its request)."""
        import ray
        actor = slot.actor
        if actor.death.done() or slot.failed:
            raise RolloutError(ErrorCode.WORKER_DIED, f"worker {slot.index} is down")
        gen = getattr(actor.handle, method).options(num_returns="streaming").remote(*args)
        actor.inflight += 1
        ended = False
        try:
            while True:
                step = asyncio.ensure_future(_next_item(gen))
                try:
                    await asyncio.wait({step, actor.death}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not step.done():
                        step.cancel()
                if not step.done() or step.cancelled():
                    if actor.death.cancelled():
                        raise RolloutError(ErrorCode.UNAVAILABLE, "the pool shut down with this request in flight")
                    raise RolloutError(ErrorCode.WORKER_DIED, f"worker {slot.index} died with this request in flight")
                exc = step.exception()
                if exc is not None:
                    ended = True               # the worker's generator raised: its task is over
                    err = to_rollout_error(exc, slot.index)
                    if err.code is ErrorCode.WORKER_DIED:
                        self.worker_died(slot, actor)
                    raise err from None
                item = step.result()
                if item is _END_OF_STREAM:
                    ended = True
                    return
                yield item
        finally:
            actor.inflight -= 1
            if not ended:
                try:
                    ray.cancel(gen)
                except Exception:  # noqa: BLE001 - already finished or the worker is gone
                    pass

    def track_ref(self, slot: Slot, ref: Any) -> None:
        """Count a ref handed to the caller as load and watch it for the worker's death."""
        actor = slot.actor
        actor.inflight += 1

        def done(fut: concurrent.futures.Future) -> None:
            actor.inflight -= 1
            self._died_if(fut, slot, actor)
        self._when_done(ref, done)

    def _watch(self, slot: Slot, actor: Incarnation) -> None:
        """Learn of ``actor``'s death with nothing in flight: its ``watch()`` call never returns while it lives,
        and Ray fails it (RayActorError) once the actor is gone."""
        actor.watch = actor.handle.watch.remote()
        self._when_done(actor.watch, lambda fut: self._died_if(fut, slot, actor))

    def _when_done(self, ref: Any, callback: Callable[[concurrent.futures.Future], None]) -> None:
        """``callback(future)`` on the pool's loop once ``ref`` resolves (Ray calls back on its own thread)."""
        def hop(fut: concurrent.futures.Future) -> None:
            try:
                self._loop.call_soon_threadsafe(callback, fut)
            except RuntimeError:   # the pool's loop is closed: shut down, nothing to tell
                pass
        ref.future().add_done_callback(hop)

    def _died_if(self, fut: concurrent.futures.Future, slot: Slot, actor: Incarnation) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None and to_rollout_error(exc, slot.index).code is ErrorCode.WORKER_DIED:
            self.worker_died(slot, actor)

    def worker_died(self, slot: Slot, actor: Incarnation) -> None:
        if actor is not slot.actor or actor.death.done() or self.closing:
            return
        logger.error("worker %d died; failing its requests and restarting it", slot.index)
        self.deaths += 1
        actor.death.set_result(None)   # wakes every call waiting on it
        slot.ready.clear()
        self._on_death(slot, actor)
        slot.restarting = self._loop.create_task(self._restart(slot, actor))

    async def _restart(self, slot: Slot, dead: Incarnation) -> None:
        _kill(dead.handle)
        try:
            async with self._weights.lock:   # a consistent weight source: not in the middle of an update
                actor = self._incarnation(slot.index)
                try:
                    # a new actor has a new fast-channel address (rollout.fast_channel): its own ready() says which
                    actor.info = await asyncio.wait_for(actor.handle.ready.remote(), self._start_timeout_s)
                    slot.actor = actor
                    held = await self._weights.reload(slot, self._start_timeout_s)
                except Exception as e:  # noqa: BLE001 - it did not come up: the slot is lost
                    slot.failed = f"restart failed: {to_rollout_error(e, slot.index).message}"
                    logger.error("worker %d: %s", slot.index, slot.failed)
                    _kill(actor.handle)
                    return
                self._watch(slot, actor)
                slot.restarts += 1
                slot.load = {}
                if held is None:
                    slot.serve()
                    logger.info("worker %d restarted at weight version %d", slot.index, self._weights.version)
                else:
                    slot.hold(held)
                    logger.error("worker %d restarted but is held out of routing: %s", slot.index, held)
        finally:
            slot.restarting = None

    async def stop(self) -> None:
        """Shut every live worker down (bounded), wake anything still waiting, kill the actors."""
        self.closing = True
        live = [s for s in self.slots if not s.actor.death.done()]
        await asyncio.gather(*(asyncio.wait_for(s.actor.handle.shutdown.remote(), 15.0) for s in live),
                             return_exceptions=True)
        for s in self.slots:
            s.actor.death.cancel()   # wake anything still waiting: the pool is gone
            _kill(s.actor.handle)

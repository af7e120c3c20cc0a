"""``RolloutPool``'s streaming half: a request's tokens as its worker generates them, not one final result.

    caller's loop:  async for delta in pool.generate_stream(...)      <-- queue <-- call_soon_threadsafe
    pool's loop:    pump: Supervisor.stream(slot, "generate_stream")  <-- Ray streaming generator (one item per
                                                                          engine step of the worker's loop)

The worker side is ``RolloutWorker.generate_stream`` / ``step_session_stream`` (async generators over its engine
loop's deltas, ``rollout.loop_streams.iterate_deltas``). Routing and bookkeeping are the non-streamed calls'
(least loaded worker; a session's turn on the worker that holds it), on the pool's loop. Closing the caller's
iterator early (a client gone) cancels the pump, which cancels the worker's task: its engine aborts the request.
A dead worker fails the stream with WORKER_DIED as it fails any call.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Optional

from engine.sampling import SamplingParams
from rollout.loop_streams import SampleDelta

_END = object()


class PoolStreamsAPI:
    """Mixed into ``RolloutPool`` (uses its ``_loop``, ``_pick``, ``_requests``, ``_workers``, ``_session_turn``)."""

    async def generate_stream(self, prompt_ids: list[int], params: SamplingParams, *,
                              request_id: Optional[str] = None) -> AsyncIterator[SampleDelta]:
        """``generate``'s samples as their worker generates them (``LocalBackend.generate_stream``'s contract)."""
        async for delta in self._bridge(self._generate_stream(prompt_ids, params, request_id)):
            yield delta

    async def step_session_stream(self, session_id: str, new_token_ids: list[int], params: SamplingParams, *,
                                  request_id: Optional[str] = None) -> AsyncIterator[SampleDelta]:
        """``step_session``'s turn as its worker generates it (``LocalBackend.step_session_stream``'s contract)."""
        async for delta in self._bridge(self._step_session_stream(session_id, new_token_ids, params, request_id)):
            yield delta

    # ---------------------------------------------------------------- on the pool's loop
    async def _generate_stream(self, prompt_ids, params, request_id) -> AsyncIterator[SampleDelta]:
        slot = await self._pick()
        rid = self._request_id(request_id)
        self._requests[rid] = slot
        try:
            async for delta in self._workers.stream(slot, "generate_stream", prompt_ids, params, rid):
                yield delta
        finally:
            self._requests.pop(rid, None)

    async def _step_session_stream(self, session_id, new_token_ids, params, request_id) -> AsyncIterator[SampleDelta]:
        async with self._session_turn(session_id, request_id) as (slot, rid):
            async for delta in self._workers.stream(slot, "step_session_stream", session_id, new_token_ids, params,
                                                    rid):
                yield delta

    async def _bridge(self, agen: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Iterate ``agen`` (an async generator that must run on the pool's loop) from the caller's loop."""
        caller = asyncio.get_running_loop()
        if caller is self._loop:
            async for item in agen:
                yield item
            return
        queue: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                caller.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:   # the caller's loop is closed: nobody reads any more
                pass

        async def pump() -> None:
            try:
                async for item in agen:
                    put(item)
                put(_END)
            except Exception as e:  # noqa: BLE001 - handed to the reader
                put(e)
            finally:
                await agen.aclose()

        fut = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            fut.cancel()   # a no-op once the pump ended; else cancels it (and the worker's task) on the pool's loop

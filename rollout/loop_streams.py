"""Incremental output of the engine loop: the tokens of a streamed request as they are generated.

``EngineLoop.generate(..., on_delta=...)`` registers a watcher; on the loop thread, after every engine step, ``report``
hands each watched request's new tokens (``LLMEngine.partial_outputs``) to its callback, and ``finished`` hands
over a sample's last tokens with its whole Trajectory when its Completion arrives::

    loop thread: engine.step() -> StreamWatchers.report(engine)   -> on_delta(SampleDelta(tokens since last))
                 _dispatch(c)  -> StreamWatchers.finished(c)      -> on_delta(SampleDelta(rest, final=Trajectory))

Per sample, the deltas' tokens concatenated are exactly the Completion's tokens (each token once, in order);
the final delta is the sample's last. Callbacks run on the loop thread: they must only hand the delta over
(``loop.call_soon_threadsafe``), never block. ``iterate_deltas`` is that hand-over for an asyncio caller (the
``LocalBackend`` and each Ray ``RolloutWorker`` stream through it).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from engine.outputs import Completion
from rollout.backend import ErrorCode, RolloutError
from rollout.loop_results import completion_to_trajectory
from rollout.trajectory import Trajectory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleDelta:
    """Tokens one sample generated since its previous delta."""
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]                                  # one per token (as Trajectory.logprobs)
    versions: list[int]                                    # one per token: the weight version that sampled it
    top_logprobs: list[list[tuple[int, float]]] | None    # per token, when requested
    final: Trajectory | None = None                        # on the sample's last delta: the whole sample


@dataclass
class _Watch:
    on_delta: Callable[[SampleDelta], None]
    sent: dict[int, int] = field(default_factory=dict)    # sample_index -> tokens handed over so far


class StreamWatchers:
    """The streamed requests of one engine loop (loop thread only)."""

    def __init__(self) -> None:
        self._watches: dict[str, _Watch] = {}

    def watch(self, request_id: str, on_delta: Callable[[SampleDelta], None]) -> None:
        self._watches[request_id] = _Watch(on_delta)

    def forget(self, request_id: str) -> None:
        self._watches.pop(request_id, None)

    def report(self, engine) -> None:
        """After a step: every watched request's new tokens."""
        for request_id, w in self._watches.items():
            for p in engine.partial_outputs(request_id, w.sent):
                if p.token_ids:
                    w.sent[p.sample_index] = p.start + len(p.token_ids)
                    self._call(w, SampleDelta(p.sample_index, p.token_ids, p.logprobs, p.versions, p.top_logprobs))

    def finished(self, c: Completion) -> None:
        """A sample's Completion: the tokens not handed over yet, and the whole sample."""
        w = self._watches.get(c.request_id)
        if w is None:
            return
        start = w.sent.pop(c.sample_index, 0)
        t = completion_to_trajectory(c)
        tops = None if t.top_logprobs is None else t.top_logprobs[start:]
        self._call(w, SampleDelta(c.sample_index, t.token_ids[start:], t.logprobs[start:], t.versions[start:], tops,
                                  final=t))

    @staticmethod
    def _call(w: _Watch, delta: SampleDelta) -> None:
        try:
            w.on_delta(delta)
        except Exception:
            logger.exception("a stream callback failed")


async def iterate_deltas(start: Callable[[Callable[[Any], None]], Future], num_samples: int
                         ) -> AsyncIterator[SampleDelta]:
    """The deltas of one request as an async iterator on the running event loop. ``start(on_delta)`` submits the
    request to an ``EngineLoop`` (``generate`` or ``step_session`` with ``on_delta``) and returns its future; the
    iterator ends after each of the ``num_samples`` samples' final delta and raises the request's
    ``RolloutError`` if it fails. Closing it early (a client gone) cancels the future: the engine aborts the
    request and frees its KV."""
    aloop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()

    def hand_over(item: Any) -> None:        # on the engine loop thread
        try:
            aloop.call_soon_threadsafe(deltas.put_nowait, item)
        except RuntimeError:                 # the event loop is closed: nobody reads any more
            pass

    fut = start(hand_over)
    fut.add_done_callback(hand_over)         # after every final delta (the loop resolves it last)
    open_samples = num_samples
    try:
        while open_samples:
            item = await deltas.get()
            if item is fut:                   # resolved before every sample ended: an error (or a cancel)
                fut.result()
                raise RolloutError(ErrorCode.INTERNAL, "the stream ended before its samples")
            open_samples -= item.final is not None
            yield item
    finally:
        if not fut.done():
            fut.cancel()                      # EngineLoop._track: the engine aborts the request

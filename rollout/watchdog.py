"""``Watchdog``: one thread that runs callbacks at deadlines (the engine loop's environment-call timeouts).

Why not a ``threading.Timer`` per call: starting a thread waits until the new thread has run, i.e. until it
gets the GIL, which a host-bound engine thread holds for most of a step. Measured on the tiny CPU benchmark
(benchmarks/episode_overhead.py), 256 ``Timer.start`` calls of 128 one-turn episodes took 270-430 ms in all
(median 0.3-0.7 ms, up to 18 ms each), 20x the environment calls they guarded, and they delayed every
episode's start and end. Arming a deadline here is a heap push under a lock.

Ordering: a callback runs on the watchdog's thread once its deadline has passed, unless ``cancel`` returned
first; a callback that has started is not stopped by ``cancel`` (callers resolve futures idempotently). A
callback must not block: it holds up the ones due after it.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable, Optional

logger = logging.getLogger(__name__)


class Deadline:
    """An armed callback; ``cancel`` it when the guarded call returns in time."""
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when                  # time.monotonic() at which the callback is due
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True             # left in the heap, skipped (and compacted away) by the watchdog


class Watchdog:
    def __init__(self, name: str = "watchdog") -> None:
        self._name = name
        self._heap: list[tuple[float, int, Deadline]] = []   # (when, tie-breaker, deadline)
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None      # started by the first arm
        self._closed = False
        self._compact_at = 64                                # heap size at which cancelled entries are dropped

    def arm(self, timeout_s: float, callback: Callable[[], None]) -> Deadline:
        """Run ``callback()`` in ``timeout_s`` seconds unless the returned deadline is cancelled first."""
        deadline = Deadline(time.monotonic() + timeout_s, callback)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._compact()
            heapq.heappush(self._heap, (deadline.when, next(self._order), deadline))
            if self._heap[0][2] is deadline:
                self._cond.notify()       # a new earliest deadline: the thread sleeps until then instead
        return deadline

    def close(self) -> None:
        """Let the thread end once no armed deadline is left (those armed still fire when due: an environment
        call that hangs past its owner's shutdown still fails its episode)."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _compact(self) -> None:
        """Drop cancelled deadlines each time the heap doubled since the last pass (each guarded call cancels
        its own when it returns in time, long before it is due: without this the heap would hold every call
        of the last ``timeout_s`` seconds). Amortised O(1) per arm. Caller holds the lock."""
        if len(self._heap) >= self._compact_at:
            self._heap = [e for e in self._heap if not e[2].cancelled]
            heapq.heapify(self._heap)
            self._compact_at = max(64, 2 * len(self._heap))

    def _next_due(self) -> Optional[Deadline]:
        """Wait for the earliest live deadline to come due and take it; None when closed with none left.
        Caller holds the lock."""
        heap = self._heap
        while True:
            while heap and heap[0][2].cancelled:
                heapq.heappop(heap)
            if not heap:
                if self._closed:
                    return None
                self._cond.wait()
                continue
            wait = heap[0][0] - time.monotonic()
            if wait <= 0:
                return heapq.heappop(heap)[2]
            self._cond.wait(wait)

    def _run(self) -> None:
        while True:
            with self._cond:
                deadline = self._next_due()
                if deadline is None:
                    self._thread = None   # an arm after close starts a new one
                    return
            if not deadline.cancelled:
                try:
                    deadline.callback()
                except Exception:  # noqa: BLE001 - one failing callback must not stop the others
                    logger.exception("a watchdog callback failed")

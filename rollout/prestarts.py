"""``Prestarts``: episodes a worker started ahead of their own ``run_episode`` calls (``RolloutPool.run_episodes_refs``).

Why: the pool hands out one Ray ref per episode, i.e. one actor call each, and a busy worker takes those calls
in slowly (each needs the GIL, which the stepping engine thread holds most of the time). Started one call at a
time, 128 episodes entered the engine over 110-380 ms on the tiny CPU benchmark (benchmarks/episode_overhead.py),
so the first steps ran a handful of sequences, the rest joined late and the last ones finished that much later.
So the pool first sends each worker one ``start_episodes`` call with its whole share, then the per-episode
calls, which only collect::

    pool ── start_episodes([(key, kwargs), ...]) ──> worker: loop.run_episode for each, futures kept by key
         ── run_episode(..., key) x N ────────────> worker: take(key) -> await that future (the ref's result)

The batch is only a head start: a ``run_episode`` whose key was not started (its batch call has not run yet,
or failed) starts the episode itself and ``claim``s the key, so the batch skips it; either way each episode
runs exactly once and its call returns what a plain ``run_episode`` would. Owned by the actor's event loop
(every async actor method runs there): no locks.

NOTE: an entry whose call never comes (a ref cancelled before its call ran) would stay forever; entries older
than ``max_age_s`` are dropped (a started episode's future is cancelled, which closes its session).
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Callable, Optional

_CLAIMED = None   # the key's own call came first and started it: the batch must not


class Prestarts:
    def __init__(self, max_age_s: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._entries: dict[str, tuple[Optional[Future], float]] = {}   # key -> (future or _CLAIMED, stamp)

    def start(self, key: str, run: Callable[[], Future]) -> None:
        """From the batch call: ``run()`` the episode now unless its own call already did."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] is _CLAIMED:
            del self._entries[key]          # both calls have been seen: nothing more to remember
            return
        self._prune()
        self._entries[key] = (run(), self._clock())

    def take(self, key: str) -> Optional[Future]:
        """From the episode's own call: the future the batch started, or None (then the caller starts the
        episode itself; the key is claimed so the batch, if it comes later, skips it)."""
        entry = self._entries.pop(key, None)
        if entry is not None and entry[0] is not _CLAIMED:
            return entry[0]
        self._prune()
        self._entries[key] = (_CLAIMED, self._clock())
        return None

    def __len__(self) -> int:
        return len(self._entries)

    def _prune(self) -> None:
        """Drop entries older than ``max_age_s``. Entries are in insertion order, oldest first (an entry is never
        updated in place), so this stops at the first young one: O(1) per add when nothing is old."""
        cutoff = self._clock() - self.max_age_s
        while self._entries:
            key = next(iter(self._entries))
            fut, stamp = self._entries[key]
            if stamp >= cutoff:
                return
            del self._entries[key]
            if fut is not None:
                fut.cancel()                        # nobody collects it: its episode closes its session

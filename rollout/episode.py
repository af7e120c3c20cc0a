"""The server-side agent loop (``EngineLoop.run_episode``): environment ``reset``/``step`` on the loop's thread
pool, model turns on the engine loop, chained by callbacks so the engine thread never waits on a tool."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Optional

from engine.sampling import SamplingParams
from rollout.backend import ErrorCode, RolloutError
from rollout.environment import get_environment
from rollout.loop_results import _resolve, error_from_exception
from rollout.trajectory import Trajectory

if TYPE_CHECKING:
    from rollout.engine_loop import EngineLoop

logger = logging.getLogger(__name__)

class Episode:
    """One server-side agent loop: a chain of callbacks between the env pool and the engine loop.
    NOTE: callbacks of engine futures run on the loop thread; they only hand work to the env pool, or do
    bookkeeping that never blocks (``_opened``, ``_closed``: no environment call is involved)."""

    def __init__(self, loop: EngineLoop, env_name: str, env_kwargs: dict[str, Any], params: SamplingParams,
                 max_turns: int, outer: Future) -> None:
        self.loop, self.env_name, self.env_kwargs = loop, env_name, env_kwargs
        self.params, self.max_turns, self.outer = params, max_turns, outer
        self.env: Any = None
        self.session_id = f"episode-{uuid.uuid4().hex[:12]}"
        self.turns = 0
        self.reward = 0.0
        self.env_seconds = 0.0
        self.truncated = False
        # True from the moment the session is open until someone closes it: the normal end, a failure or a
        # cancellation, whichever comes first (they run on different threads; the lock makes it exactly once).
        self._session_open = False
        self._session_lock = threading.Lock()

    def start(self) -> None:
        self.outer.add_done_callback(self._on_outer_done)
        self._on_env(self._reset, env_call="reset")

    def _on_outer_done(self, outer: Future) -> None:
        """A caller that gives up (cancels the future: asyncio cancellation, a pool or front-end timeout) frees
        the session's KV now, not at its TTL. Closing aborts a turn in flight; a tool call in flight runs on
        (Python cannot stop its thread) but its result is dropped."""
        if outer.cancelled():
            self._release_session()

    def _release_session(self) -> Optional[Future]:
        """Close the session if it is open and nobody closed it yet; the close future, else None."""
        with self._session_lock:
            if not self._session_open:
                return None
            self._session_open = False
        return self.loop.close_session(self.session_id)

    # ---------------------------------------------------------------- env side (thread pool)
    def _on_env(self, fn: Callable[..., None], *args: Any, env_call: str = "") -> None:
        """Run ``fn`` on the env pool; ``env_call`` names the environment method it calls (reset/step),
        which then gets ``env_timeout_s``: past it the episode fails with ABORTED (never hangs)."""
        timeout = self.loop.env_timeout_s if env_call else None

        def timed() -> None:
            # The clock starts when the call starts, not when it was queued behind other episodes'
            # environment calls (a busy pool must not time episodes out).
            deadline = None
            if timeout is not None:
                deadline = self.loop.watchdog.arm(timeout, lambda: self._fail(RolloutError(
                    ErrorCode.ABORTED, f"environment {self.env_name!r}: {env_call} did not return within "
                                       f"{timeout} s (env_timeout_s); the episode is abandoned")))
            try:
                self._guard(fn, *args)
            finally:
                if deadline is not None:
                    deadline.cancel()
        try:
            self.loop._env_pool.submit(timed)
        except RuntimeError:   # pool shut down
            self._fail(RolloutError(ErrorCode.UNAVAILABLE, "the engine loop is shut down"))

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except RolloutError as e:
            self._fail(e)
        except Exception as e:  # noqa: BLE001 - an environment bug fails its episode only
            logger.exception("environment %r failed", self.env_name)
            code = ErrorCode.BAD_REQUEST if self.env is None and isinstance(e, (ValueError, TypeError)) \
                else ErrorCode.INTERNAL
            self._fail(RolloutError(code, f"environment {self.env_name!r}: {type(e).__name__}: {e}"))

    def _reset(self) -> None:
        self.env = get_environment(self.env_name, tokenizer=self.loop.tokenizer(), **self.env_kwargs)
        t0 = time.perf_counter()
        obs = list(self.env.reset())
        self.env_seconds += time.perf_counter() - t0
        if self.outer.done():   # cancelled, or failed (timed out) while reset ran
            return
        # The first turn is queued right behind the open, not after a hop back to the env pool: the loop runs
        # commands in order, so the open's callback (below) has run by the time the turn's command does, and
        # the episode's first tokens enter the engine one step earlier (each hop waits for the GIL).
        self.loop.open_session(self.session_id).add_done_callback(self._opened)
        self._turn(obs)

    def _opened(self, opening: Future) -> None:
        """On the loop thread (or at once, if the open was refused on submission): the session is open, or the
        episode fails with the open's error (the turn queued behind it then fails too, unseen)."""
        error = _error_of(opening)
        if error is not None:
            self._fail(error)
            return
        with self._session_lock:
            self._session_open = True
        if self.outer.done():   # cancelled before the session was open: close it now (the queued turn is aborted)
            self._release_session()

    def _turn(self, obs: list[int]) -> None:
        if self.outer.done():   # cancelled or failed: close the session (if nobody has) and go no further
            self._release_session()
            return
        self._chain(self.loop.step_session(self.session_id, obs, self.params), self._on_turn,
                    on_error=self._turn_failed, env_call="step")

    def _turn_failed(self, error: RolloutError) -> bool:
        """A later turn that no longer fits the context ends the episode as truncated (finish_reason
        "length", the observation not appended) rather than losing it."""
        if error.code is not ErrorCode.TOO_LARGE or self.turns == 0:
            return False
        self.truncated = True
        self._on_env(self._close)
        return True

    def _on_turn(self, turn: Trajectory) -> None:
        if self.outer.done():   # cancelled while the turn ran (its session closed, the turn aborted): no env step
            self._release_session()
            return
        self.turns += 1
        t0 = time.perf_counter()
        obs, reward, done = self.env.step(list(turn.token_ids))
        self.env_seconds += time.perf_counter() - t0
        if self.outer.done():   # failed (timed out) while step ran: _fail closed the session
            return
        self.reward += float(reward)
        if done or self.turns >= self.max_turns or turn.finish_reason == "aborted":
            self._close()
        else:
            self._turn(list(obs))

    def _close(self) -> None:
        closing = self._release_session()
        if closing is not None:   # None: a cancellation closed it first; nobody waits for the trajectory
            closing.add_done_callback(self._closed)   # no environment call left: no hop to the env pool

    def _closed(self, closing: Future) -> None:
        """On the loop thread: the session's whole trajectory, with the episode's figures, for the caller."""
        error = _error_of(closing)
        if error is not None:
            self._fail(error)
            return
        whole = closing.result()
        whole.reward = self.reward
        if self.truncated:
            whole.finish_reason = "length"
        whole.metrics.update(env_seconds=self.env_seconds, env_name=self.env_name)
        self.loop.counters.episodes += 1
        _resolve(self.outer, whole)

    # ---------------------------------------------------------------- plumbing
    def _chain(self, fut: Future, then: Callable[[Any], None],
               on_error: Optional[Callable[[RolloutError], bool]] = None, env_call: str = "") -> None:
        """When ``fut`` resolves, run ``then(result)`` on the env pool; an error fails the episode unless
        ``on_error`` handles it (returns True)."""
        def done(f: Future) -> None:
            error = _error_of(f)
            if error is None:
                self._on_env(then, f.result(), env_call=env_call)
            elif on_error is None or not on_error(error):
                self._fail(error)
        fut.add_done_callback(done)

    def _fail(self, error: BaseException) -> None:
        self._release_session()   # best effort: free its KV
        _resolve(self.outer, error=error_from_exception(error))


def _error_of(f: Future) -> Optional[RolloutError]:
    """A resolved engine future's error as the episode reports it, or None when it succeeded."""
    if f.cancelled():
        return RolloutError(ErrorCode.ABORTED, "cancelled")
    exc = f.exception()
    return None if exc is None else error_from_exception(exc)

"""``EngineLoop``: one ``LLMEngine`` driven by one background thread, fed through a command queue.

The loop thread is the only one that touches the engine (STYLE.md: one owner per piece of state). Callers
on any thread enqueue a command and get a ``concurrent.futures.Future`` back (``asyncio.wrap_future`` makes
it awaitable)::

    caller threads ──cmd──> [queue] ──> loop thread: run commands ─> engine.step() while work exists
         ^                                                │            (blocks on the queue when idle)
         └──────────── Future.set_result / set_exception ─┘

Futures resolve with ``Trajectory`` objects (``rollout.trajectory``) or raise ``RolloutError``: engine
errors are mapped to an ``ErrorCode`` (``error_from_exception``); an unexpected exception while stepping
fails every pending future with INTERNAL and the loop keeps going; ``shutdown`` fails whatever is left with
UNAVAILABLE. Cancelling a future aborts its request; cancelling an episode's future closes its session at
once (its KV is freed, a turn in flight is aborted, the environment is not stepped again).

Sessions: the loop accumulates each session's whole trajectory across turns (the first turn's tokens are
its ``prompt_ids``, later new tokens are environment tokens with loss mask 0, model tokens carry loss mask
1, logprobs and versions); ``close_session`` returns it.

Server-side agent loop (``run_episode``, ``rollout.episode``): environment ``reset``/``step`` run on a small
thread pool and only *submit* commands; the engine thread never waits on an environment, so a slow tool never
stalls other requests. An episode is a chain of callbacks: env reset -> open session -> turn -> env step ->
turn ... -> close session -> trajectory with the summed reward. Futures, error codes and trajectories of
completions: ``rollout.loop_results``.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import Completion
from engine.sampling import SamplingParams
from rollout.backend import ErrorCode, RolloutError
from rollout.episode import Episode
from rollout.loop_results import _metrics, _resolve, completion_to_trajectory, error_from_exception
from rollout.loop_streams import SampleDelta, StreamWatchers
from rollout.trajectory import Trajectory
from rollout.watchdog import Watchdog
from scheduler import SessionError

logger = logging.getLogger(__name__)

_STOP = object()   # sentinel command: leave the loop
TTL_POLL_S = 0.5   # how often an idle loop holding sessions runs an empty step to expire idle ones
DEFAULT_ENV_TIMEOUT_S = 600.0   # one environment reset/step call; past it the episode fails (ABORTED)


@dataclass
class _Pending:
    """A request whose samples are still being generated."""
    future: Future
    num_samples: int
    finish: Callable[[list[Completion]], Any]      # runs on the loop thread with the samples by index
    samples: dict[int, Completion] = field(default_factory=dict)


@dataclass
class _SessionRecord:
    trajectory: Optional[Trajectory] = None        # None until the first turn's tokens arrive


@dataclass
class LoopCounters:
    """Per-loop figures the pool reads to prove routing (which worker served each turn)."""
    session_turns: int = 0            # turns finished in sessions
    resumed_turns: int = 0            # ... after a session's first turn
    resident_turns: int = 0           # ... of those, computed only their new tokens (the session's KV was here)
    episodes: int = 0                 # server-side agent loops finished


class EngineLoop:
    def __init__(self, engine_config: EngineConfig, *, env_threads: int = 4,
                 env_timeout_s: Optional[float] = DEFAULT_ENV_TIMEOUT_S) -> None:
        self.engine = LLMEngine(engine_config)
        # Read when each environment call starts. NOTE: a call past it fails its episode, but Python cannot
        # stop the thread: a hung environment keeps one of the env_threads until it returns.
        self.env_timeout_s = env_timeout_s
        self.counters = LoopCounters()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[str, _Pending] = {}
        self._sessions: dict[str, _SessionRecord] = {}
        self._streams = StreamWatchers()       # streamed requests (generate on_delta): their tokens after each step
        self._expired_seen = 0                 # scheduler.stats.expired_sessions already pruned from _sessions
        self._ids = itertools.count()
        self._closing = False
        self._submit_lock = threading.Lock()   # no command is queued after the stop sentinel
        self._env_pool = ThreadPoolExecutor(max_workers=env_threads, thread_name_prefix="rollout-env")
        self.watchdog = Watchdog("rollout-env-watchdog")   # env_timeout_s of every environment call
        self._tokenizer: Any = None
        self._tokenizer_loaded = False
        self._tokenizer_lock = threading.Lock()
        self.load_snapshot: dict[str, int] = {}   # replaced (never mutated) by the loop thread after each step
        self._snapshot_load()
        self._thread = threading.Thread(target=self._run, name="rollout-engine-loop", daemon=True)
        self._thread.start()

    # ================================================================ public API (any thread)
    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: Optional[str] = None, *,
                 on_delta: Callable[[SampleDelta], None] | None = None) -> "Future[list[Trajectory]]":
        """``params.n`` samples of one prompt, by sample_index. ``on_delta``: also hand each sample's new tokens
        over after every step, on the loop thread (``rollout.loop_streams``; the future resolves last)."""
        def run(engine: LLMEngine, fut: Future) -> None:
            rid = engine.add_request(prompt_ids, params, request_id or self._new_id("gen"))
            if on_delta is not None:
                self._streams.watch(rid, on_delta)
            self._track(rid, fut, params.n, lambda cs: [completion_to_trajectory(c) for c in cs])
        return self._submit(run)

    def open_session(self, session_id: Optional[str] = None, ttl_s: Optional[float] = None) -> "Future[str]":
        def run(engine: LLMEngine, fut: Future) -> None:
            sid = engine.open_session(session_id, ttl_s=ttl_s)
            self._sessions[sid] = _SessionRecord()
            _resolve(fut, sid)
        return self._submit(run)

    def step_session(self, session_id: str, new_token_ids: list[int], params: SamplingParams,
                     request_id: Optional[str] = None, *,
                     on_delta: Callable[[SampleDelta], None] | None = None) -> "Future[Trajectory]":
        """Append ``new_token_ids`` and generate the model's turn; resolves with this turn only. ``on_delta``: as
        ``generate``'s (the final delta's ``final`` is the engine's sample; the future's Trajectory follows)."""
        new_tokens = list(new_token_ids) if isinstance(new_token_ids, (list, tuple)) else new_token_ids

        def run(engine: LLMEngine, fut: Future) -> None:
            rid = engine.submit_turn(session_id, new_tokens, params, request_id or self._new_id("turn"))
            if on_delta is not None:
                self._streams.watch(rid, on_delta)
            self._track(rid, fut, 1, lambda cs: self._finish_turn(session_id, new_tokens, cs[0]))
        return self._submit(run)

    def close_session(self, session_id: str) -> "Future[Trajectory]":
        """Free the session; resolves with its whole trajectory. A turn in progress comes back aborted."""
        def run(engine: LLMEngine, fut: Future) -> None:
            try:
                finished = engine.close_session(session_id)
            except SessionError:
                self._sessions.pop(session_id, None)   # expired by TTL: forget our record too
                raise
            self._dispatch(finished)                    # resolves the aborted turn's future first
            record = self._sessions.pop(session_id, None) or _SessionRecord()
            _resolve(fut, record.trajectory or Trajectory(prompt_ids=[], session_id=session_id))
        return self._submit(run)

    def abort(self, request_id: str) -> "Future[bool]":
        def run(engine: LLMEngine, fut: Future) -> None:
            finished = engine.abort(request_id)
            self._dispatch(finished)
            _resolve(fut, bool(finished))
        return self._submit(run)

    def update_weights(self, make_loader: Callable[[], Any], version: Optional[int] = None, mode: str = "keep",
                       kv: str = "keep") -> "Future[dict[str, Any]]":
        """Build the loader (``make_loader()``) and apply it, both on the loop thread, between two steps.
        Resolves with {"version", "seconds", "num_bytes", "num_tensors", "timeline"}: ``timeline`` holds
        ``time.monotonic()`` stamps (one clock for every process of the machine) of the engine thread taking the
        update, the loader built and the update applied, for the caller's split of where an update's time went."""
        def run(engine: LLMEngine, fut: Future) -> None:
            taken = time.monotonic()
            try:
                loader = make_loader()
            except Exception as e:  # noqa: BLE001 - a loader that cannot even start is a failed update
                raise RolloutError(ErrorCode.UPDATE_FAILED, f"building the loader failed: {type(e).__name__}: {e}")
            built = time.monotonic()
            try:
                report = engine.update_weights(loader, version, mode=mode, kv=kv)
            except BaseException:
                # a failure that aborted in-flight work leaves completions for the engine's next step()
                self._dispatch(engine.step())
                raise
            if mode != "keep" or engine.has_completions():
                # "drain"/"abort" (or a step queued ahead that the update read out) leave completions for the
                # engine's next step(): hand them out now. Otherwise the loop steps on by itself when work waits.
                self._dispatch(engine.step())
            _resolve(fut, {"version": engine.weight_version, "seconds": report.seconds,
                           "num_bytes": report.num_bytes, "num_tensors": report.num_tensors,
                           "timeline": {"engine_taken": taken, "loader_built": built,
                                        "applied": time.monotonic()}})
        return self._submit(run)

    def sleep(self, level: int) -> "Future[dict[str, Any]]":
        """Release the engine's device memory between two steps (``LLMEngine.sleep``); running work finishes
        first, queued work waits for ``wake_up``. Resolves with the report's fields."""
        def run(engine: LLMEngine, fut: Future) -> None:
            try:
                report = engine.sleep(level)
            except ValueError as e:
                raise RolloutError(ErrorCode.BAD_REQUEST, str(e)) from None
            finally:
                self._dispatch(engine.step())      # completions of the work sleep finished
            _resolve(fut, dataclasses.asdict(report))
        return self._submit(run)

    def wake_up(self) -> "Future[dict[str, Any]]":
        def run(engine: LLMEngine, fut: Future) -> None:
            try:
                report = engine.wake_up()
            except ValueError as e:
                raise RolloutError(ErrorCode.BAD_REQUEST, str(e)) from None
            _resolve(fut, dataclasses.asdict(report))
        return self._submit(run)

    def stats(self) -> "Future[dict[str, Any]]":
        def run(engine: LLMEngine, fut: Future) -> None:
            s = engine.stats()
            c = self.counters
            s.update(session_turns=c.session_turns, resumed_turns=c.resumed_turns, resident_turns=c.resident_turns,
                     episodes=c.episodes, pending_requests=len(self._pending), tracked_sessions=len(self._sessions))
            _resolve(fut, s)
        return self._submit(run)

    def weights_digest(self) -> "Future[dict[str, Any]]":
        """On the engine thread (between steps, never during an update): the content digest of every parameter
        (``weight_sync.digest.digest_of``: names, shapes, dtypes, bytes) and the weight version, so a caller
        can check that an update landed bit for bit."""
        def run(engine: LLMEngine, fut: Future) -> None:
            from weight_sync.digest import digest_of
            _resolve(fut, {"digest": digest_of(engine.model.named_parameters()), "version": engine.weight_version})
        return self._submit(run)

    def run_episode(self, env_name: str, env_kwargs: Optional[dict[str, Any]], params: SamplingParams,
                    max_turns: int) -> "Future[Trajectory]":
        """Server-side agent loop: until the environment says done or ``max_turns`` model turns ran.
        Resolves with the session's whole trajectory, ``reward`` = the sum of the steps' rewards."""
        outer: Future = Future()
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            _resolve(outer, error=RolloutError(ErrorCode.BAD_REQUEST, f"max_turns must be an int >= 1, got {max_turns!r}"))
            return outer
        if not isinstance(params, SamplingParams) or params.n != 1:
            _resolve(outer, error=RolloutError(ErrorCode.BAD_REQUEST, "run_episode needs SamplingParams with n=1"))
            return outer
        if env_kwargs is not None and not isinstance(env_kwargs, dict):
            _resolve(outer, error=RolloutError(ErrorCode.BAD_REQUEST, "env_kwargs must be a dict"))
            return outer
        if self._closing:
            _resolve(outer, error=RolloutError(ErrorCode.UNAVAILABLE, "the engine loop is shut down"))
            return outer
        Episode(self, env_name, dict(env_kwargs or {}), params, max_turns, outer).start()
        return outer

    def tokenizer(self) -> Any:
        """The model's tokenizer, or None when its directory has none (tiny test models). Loaded once, apart
        from the engine (its ``tokenizer`` property belongs to the loop thread)."""
        with self._tokenizer_lock:
            if not self._tokenizer_loaded:
                path = Path(self.engine.model_path)
                if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
                    from transformers import AutoTokenizer
                    self._tokenizer = AutoTokenizer.from_pretrained(str(path))
                self._tokenizer_loaded = True
            return self._tokenizer

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the loop thread; every pending request fails with UNAVAILABLE."""
        with self._submit_lock:
            if self._closing:
                return
            self._closing = True
            self._commands.put(_STOP)
        self._thread.join(timeout_s)
        self._env_pool.shutdown(wait=False, cancel_futures=True)
        self.watchdog.close()

    # ================================================================ loop thread
    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def _submit(self, run: Callable[[LLMEngine, Future], None]) -> Future:
        fut: Future = Future()
        with self._submit_lock:
            if not self._closing:
                self._commands.put((run, fut))
                return fut
        _resolve(fut, error=RolloutError(ErrorCode.UNAVAILABLE, "the engine loop is shut down"))
        return fut

    def _track(self, request_id: str, fut: Future, num_samples: int,
               finish: Callable[[list[Completion]], Any]) -> None:
        self._pending[request_id] = _Pending(fut, num_samples, finish)
        # A caller that gives up (asyncio cancellation) frees the engine's work too.
        fut.add_done_callback(lambda f: f.cancelled() and self.abort(request_id))

    def _run(self) -> None:
        while True:
            # Block only when the engine has nothing to do; otherwise take what is queued and step.
            # NOTE: session TTLs expire inside ``schedule()``; an idle engine holding sessions wakes every
            # TTL_POLL_S for an empty step, or a vanished client's session would hold its KV until the
            # next request arrives.
            busy = self.engine.has_unfinished()
            try:
                if busy:
                    cmd = self._commands.get_nowait()
                else:
                    cmd = self._commands.get(timeout=TTL_POLL_S if self.engine.scheduler.sessions else None)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd is _STOP:
                    self._fail_everything(RolloutError(ErrorCode.UNAVAILABLE, "the engine loop is shutting down"))
                    return
                self._execute(*cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self.engine.has_unfinished() or self.engine.scheduler.sessions:
                try:
                    self._dispatch(self.engine.step())   # idle with sessions: an empty step (TTL expiry only)
                    self._streams.report(self.engine)
                except Exception as e:  # noqa: BLE001 - the loop must survive to fail and serve requests
                    logger.exception("engine step failed")
                    self._recover(RolloutError(ErrorCode.INTERNAL, f"engine step failed: {type(e).__name__}: {e}"))
                self._forget_expired_sessions()
            self._snapshot_load()

    def _forget_expired_sessions(self) -> None:
        """Drop our trajectory record of sessions the scheduler expired (TTL): a client that vanished never
        closes them, and the records would pile up for the life of the worker."""
        expired = self.engine.scheduler.stats.expired_sessions
        if expired != self._expired_seen:
            self._expired_seen = expired
            live = self.engine.scheduler.sessions
            for sid in [sid for sid in self._sessions if sid not in live]:
                del self._sessions[sid]

    def _snapshot_load(self) -> None:
        sched = self.engine.scheduler
        self.load_snapshot = {"num_free_blocks": sched.kv.headroom, "num_total_blocks": sched.pool.num_blocks,
                              "num_waiting": len(sched.waiting), "num_running": len(sched.running),
                              "open_sessions": len(sched.sessions), "weight_version": self.engine.weight_version}

    def _execute(self, run: Callable[[LLMEngine, Future], None], fut: Future) -> None:
        if fut.done():          # cancelled while queued
            return
        try:
            run(self.engine, fut)
        except Exception as e:  # noqa: BLE001 - every command's error goes to its caller
            _resolve(fut, error=error_from_exception(e))

    def _dispatch(self, completions: list[Completion]) -> None:
        for c in completions:
            p = self._pending.get(c.request_id)
            if p is None:
                continue
            p.samples[c.sample_index] = c
            self._streams.finished(c)
            if len(p.samples) < p.num_samples:
                continue
            del self._pending[c.request_id]
            self._streams.forget(c.request_id)
            try:
                result = p.finish([p.samples[i] for i in range(p.num_samples)])
            except Exception as e:  # noqa: BLE001
                logger.exception("finishing %s failed", c.request_id)
                _resolve(p.future, error=error_from_exception(e))
            else:
                _resolve(p.future, result)

    def _finish_turn(self, session_id: str, new_tokens: list[int], c: Completion) -> Trajectory:
        record = self._sessions.setdefault(session_id, _SessionRecord())
        whole = record.trajectory
        first = whole is None
        if first:
            whole = record.trajectory = Trajectory(prompt_ids=list(new_tokens), session_id=session_id)
        else:
            whole.add_env_tokens(list(new_tokens))
        whole.add_model_tokens(c.token_ids, c.logprobs, c.versions, c.top_logprobs)
        # the turn's routing covers the session's whole history so far (the earlier turns' included)
        whole.routed_experts = c.routed_experts.to_wire() if c.routed_experts is not None else None
        whole.turns += 1
        whole.finish_reason = c.finish_reason
        for key, value in _metrics(c).items():
            whole.metrics[key] = whole.metrics.get(key, 0) + value
        self.counters.session_turns += 1
        resident = False
        if not first:
            self.counters.resumed_turns += 1
            # Only the new tokens (plus the previous turn's last sampled one) were computed: the KV was here.
            resident = c.num_prefill_tokens <= len(new_tokens) + 1
            self.counters.resident_turns += resident
        turn = completion_to_trajectory(c)
        turn.prompt_ids = list(new_tokens)
        turn.routed_experts = None   # it covers the whole history: the session's trajectory (``whole``) carries it
        turn.turns = whole.turns
        turn.metrics["kv_resident"] = resident
        return turn

    def _fail_everything(self, error: RolloutError) -> None:
        pending, self._pending = self._pending, {}
        self._streams = StreamWatchers()
        for p in pending.values():
            _resolve(p.future, error=error)
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd is not _STOP:
                _resolve(cmd[1], error=error)

    def _recover(self, error: RolloutError) -> None:
        """After an unexpected step failure: fail every pending request and take them out of the engine so
        the next step starts clean (sessions stay open; their running turn comes back aborted)."""
        pending, self._pending = self._pending, {}
        self._streams = StreamWatchers()
        for rid, p in pending.items():
            _resolve(p.future, error=error)
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001
                logger.exception("could not abort %s after a failed step", rid)

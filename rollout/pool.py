"""``RolloutPool``: N ``RolloutWorker`` actors behind one ``RolloutBackend``, placed through a Ray placement
group (one bundle per worker: ``{"CPU": c}`` or ``{"CPU": c, "GPU": 1}``; "PACK" or "SPREAD" over nodes).

Threading: the pool's state (routing counters, the session affinity map, the weight source) has one owner,
a private asyncio loop on a background thread. Async methods hop onto it, so they work from any event loop;
the synchronous training-loop API (``generate_refs``, ``run_episodes_refs``) hops onto it too.

Routing: a new session or request goes to the least loaded ready worker, by the pool's own counters
(calls in flight + open sessions, then free KV blocks from the last load snapshot; no RPC per request);
every later turn of a session goes to the worker that opened it (affinity map).

Weights: ``update_weights`` / ``update_weights_from_state_dict`` run on every worker concurrently and return
once all of them reached the new version (one barrier; the outcomes are in ``rollout.pool_weights``). The
pool keeps the last complete source (loader name + kwargs, or the object refs of an in-memory update) to
reload a restarted worker. A worker that dies during an update is restarted on the new weights and does
not count as a failure.

Faults: a call that sees ``RayActorError`` marks its worker dead, and so does the failure of the one
``watch()`` call the pool keeps open on every actor, so a worker that dies idle is noticed before anything
is routed to it (within Ray's failure detection: about a second for a killed process). Every call still
waiting on that worker fails at once with WORKER_DIED (each waits on its result *or* the worker's death),
sessions that lived on it are forgotten (their later turns get UNKNOWN_SESSION), and a new actor starts in
the same bundle and loads the current weights before it takes requests. Refs handed out by
``generate_refs`` raise Ray's own error; ``as_completed`` turns it into ``RolloutError(WORKER_DIED)``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from typing import Any, Optional

from engine.config import EngineConfig
from engine.sampling import SamplingParams
from rollout.backend import ErrorCode, RolloutError, gather_or_cancel
from rollout.pool_slots import Incarnation, Slot, as_completed, default_runtime_env, to_rollout_error
from rollout.pool_weights import WeightState
from rollout.trajectory import Trajectory
from rollout.worker import RolloutWorker, WeightSource

logger = logging.getLogger(__name__)

PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
SESSION_EXPIRY_GRACE_S = 5.0   # past a session's TTL, before the pool forgets it (its worker expired it by then)


class RolloutPool:
    def __init__(self, engine_config: EngineConfig, num_workers: int, *, placement: str = "PACK",
                 address: Optional[str] = None, num_cpus_per_worker: float = 1.0, env_threads: int = 4,
                 runtime_env: Optional[dict[str, Any]] = None, start_timeout_s: float = 300.0,
                 load_refresh_s: float = 1.0) -> None:
        import ray
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if not ray.is_initialized():
            ray.init(address=address, runtime_env=runtime_env or default_runtime_env(), include_dashboard=False)
        self.engine_config = engine_config
        self.num_workers = num_workers
        self._gpu = engine_config.device.startswith("cuda")
        # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES: inside, the engine's device is plain "cuda".
        self._worker_config = dataclasses.replace(engine_config, device="cuda") if self._gpu else engine_config
        self._cpus = float(num_cpus_per_worker)
        self._env_threads = env_threads
        self._start_timeout_s = start_timeout_s
        self._load_refresh_s = load_refresh_s
        self._slots: list[Slot] = []
        self._affinity: dict[str, Slot] = {}          # session id -> its worker
        # session id -> (ttl_s, idle since: monotonic time its last turn ended, None while a turn runs). A session
        # idle past its TTL (+ grace) has been expired by its worker: forget it here too (a vanished client never
        # closes it, and its affinity entry would count as load forever).
        self._session_ttl: dict[str, tuple[float, Optional[float]]] = {}
        self._requests: dict[str, Slot] = {}          # request id in flight -> its worker
        self._ids = itertools.count()
        self._weights = WeightState()
        self._closing = False
        self._worker_deaths = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rollout-pool", daemon=True)
        self._thread.start()
        self._sync(self._start(placement), timeout=start_timeout_s + 30)

    # ================================================================ plumbing
    def _sync(self, coro, timeout: Optional[float] = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _hop(self, coro) -> Any:
        """Run ``coro`` on the pool's loop and await it from the caller's."""
        try:
            if asyncio.get_running_loop() is self._loop:
                return await coro
        except RuntimeError:
            pass
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def _spawn(self, index: int) -> Incarnation:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        actor_cls = ray.remote(RolloutWorker)
        handle = actor_cls.options(
            num_cpus=self._cpus, num_gpus=1 if self._gpu else 0, max_concurrency=1000, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=index),
        ).remote(self._worker_config, index, self._env_threads)
        return Incarnation(handle, self._loop.create_future())

    async def _start(self, placement: str) -> None:
        from ray.util.placement_group import placement_group
        bundle = {"CPU": self._cpus, **({"GPU": 1} if self._gpu else {})}
        self._pg = placement_group([dict(bundle) for _ in range(self.num_workers)], strategy=placement)
        try:
            await asyncio.wait_for(self._pg.ready(), self._start_timeout_s)
        except asyncio.TimeoutError:
            raise RolloutError(ErrorCode.UNAVAILABLE, f"the cluster cannot place {self.num_workers} x {bundle} "
                                                      f"({placement}) within {self._start_timeout_s} s") from None
        self._slots = [Slot(i, self._spawn(i), asyncio.Event()) for i in range(self.num_workers)]
        infos = await asyncio.gather(*(asyncio.wait_for(s.actor.handle.ready.remote(), self._start_timeout_s)
                                       for s in self._slots))
        self.worker_info = list(infos)
        for s in self._slots:
            self._watch(s, s.actor)
            s.ready.set()
        self._refresher = self._loop.create_task(self._refresh_loads())

    async def _refresh_loads(self) -> None:
        """Free-KV snapshots for routing: one tiny call per worker per period, not one per request."""
        while not self._closing:
            await asyncio.sleep(self._load_refresh_s)
            self._forget_expired_sessions()
            for s in self._slots:
                if s.ready.is_set() and not s.actor.death.done():
                    try:
                        s.load = await asyncio.wait_for(s.actor.handle.load.remote(), 5.0)
                    except Exception:  # noqa: BLE001 - a dead worker is found by the calls themselves
                        pass

    def _forget_expired_sessions(self) -> None:
        now = time.monotonic()
        for sid, (ttl, idle_since) in list(self._session_ttl.items()):
            if idle_since is not None and now - idle_since > ttl + SESSION_EXPIRY_GRACE_S:
                slot = self._affinity.get(sid)
                if slot is not None:
                    self._forget_session(sid, slot)
                self._session_ttl.pop(sid, None)

    async def _call(self, slot: Slot, method: str, *args: Any) -> Any:
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
                self._worker_died(slot, actor)
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

    def _track_ref(self, slot: Slot, ref: Any) -> None:
        """Count a ref handed to the caller as load and watch it for the worker's death."""
        actor = slot.actor
        actor.inflight += 1

        def done(fut: concurrent.futures.Future) -> None:
            actor.inflight -= 1
            self._died_if(fut, slot, actor)
        self._when_done(ref, done)

    def _watch(self, slot: Slot, actor: Incarnation) -> None:
        """Learn of ``actor``'s death with nothing in flight: its ``watch()`` call never returns while it lives,
        and Ray fails it (RayActorError) once the actor is gone, within Ray's own failure detection (a killed
        process: about a second; a lost node: the GCS heartbeat timeout)."""
        actor.watch = actor.handle.watch.remote()
        self._when_done(actor.watch, lambda fut: self._died_if(fut, slot, actor))

    def _when_done(self, ref: Any, callback) -> None:
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
            self._worker_died(slot, actor)

    def _worker_died(self, slot: Slot, actor: Incarnation) -> None:
        if actor is not slot.actor or actor.death.done() or self._closing:
            return
        logger.error("worker %d died; failing its requests and restarting it", slot.index)
        self._worker_deaths += 1
        actor.death.set_result(None)   # wakes every call waiting on it
        slot.ready.clear()
        for sid in [sid for sid, s in self._affinity.items() if s is slot]:
            del self._affinity[sid]
            self._session_ttl.pop(sid, None)
        slot.open_sessions = 0
        slot.restarting = self._loop.create_task(self._restart(slot, actor))

    async def _restart(self, slot: Slot, dead: Incarnation) -> None:
        import ray
        try:
            ray.kill(dead.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        try:
            async with self._weights.lock:   # a consistent weight source: not in the middle of an update
                actor = self._spawn(slot.index)
                try:
                    await asyncio.wait_for(actor.handle.ready.remote(), self._start_timeout_s)
                    slot.actor = actor
                    held = await self._weights.reload(slot, self._start_timeout_s)
                except Exception as e:  # noqa: BLE001 - it did not come up: the slot is lost
                    slot.failed = f"restart failed: {to_rollout_error(e, slot.index).message}"
                    logger.error("worker %d: %s", slot.index, slot.failed)
                    try:
                        ray.kill(actor.handle, no_restart=True)
                    except Exception:  # noqa: BLE001
                        pass
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

    async def _pick(self) -> Slot:
        """The least loaded serving worker; waits (bounded) while no worker serves and some are restarting."""
        if self._closing:
            raise RolloutError(ErrorCode.UNAVAILABLE, "the pool is shut down")
        if self._weights.inconsistent:
            raise RolloutError(ErrorCode.UNAVAILABLE, "the pool's workers hold different weight versions after a "
                                                      "partial update; run update_weights to bring them together")
        ready = [s for s in self._slots if s.ready.is_set()]
        if not ready:
            restarts = [s.restarting for s in self._slots if s.restarting is not None]
            if restarts:   # NOTE: asyncio.wait does not cancel them on timeout
                await asyncio.wait(restarts, timeout=self._start_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            ready = [s for s in self._slots if s.ready.is_set()]
            if not ready:
                held = "; ".join(f"worker {s.index}: {s.failed or s.awaiting_weights or 'restarting'}"
                                 for s in self._slots)
                raise RolloutError(ErrorCode.UNAVAILABLE, f"no worker is available ({held})")
        return min(ready, key=Slot.key)

    def _request_id(self, request_id: Optional[str]) -> str:
        return request_id if request_id is not None else f"pool-{next(self._ids)}"

    # ================================================================ RolloutBackend
    async def generate(self, prompt_ids: list[int], params: SamplingParams, *,
                       request_id: Optional[str] = None) -> list[Trajectory]:
        return await self._hop(self._generate(prompt_ids, params, request_id))

    async def _generate(self, prompt_ids, params, request_id) -> list[Trajectory]:
        slot = await self._pick()
        rid = self._request_id(request_id)
        self._requests[rid] = slot
        try:
            return await self._call(slot, "generate", prompt_ids, params, rid)
        finally:
            self._requests.pop(rid, None)

    async def generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Trajectory]]:
        """Every prompt concurrently (spread over the workers); results in prompt order."""
        return await gather_or_cancel(*(self.generate(p, params) for p in prompts))

    async def open_session(self, session_id: Optional[str] = None, ttl_s: Optional[float] = None) -> str:
        return await self._hop(self._open_session(session_id, ttl_s))

    async def _open_session(self, session_id, ttl_s) -> str:
        if session_id is None:
            session_id = f"session-{uuid.uuid4().hex[:16]}"
        if session_id in self._affinity:
            raise RolloutError(ErrorCode.BAD_REQUEST, f"session {session_id!r} is already open")
        slot = await self._pick()
        self._affinity[session_id] = slot     # claim it now: concurrent opens see the load
        slot.open_sessions += 1
        try:
            sid = await self._call(slot, "open_session", session_id, ttl_s)
        except BaseException:
            if self._affinity.get(session_id) is slot:
                del self._affinity[session_id]
                slot.open_sessions -= 1
            raise
        slot.sessions_opened += 1
        ttl = self.engine_config.session_ttl_s if ttl_s is None else float(ttl_s)
        self._session_ttl[sid] = (ttl, time.monotonic())
        return sid

    def _session_slot(self, session_id: str) -> Slot:
        slot = self._affinity.get(session_id)
        if slot is None:
            raise RolloutError(ErrorCode.UNKNOWN_SESSION, f"session {session_id!r} is unknown, closed, "
                                                          "or was lost with its worker")
        return slot

    def _forget_session(self, session_id: str, slot: Slot) -> None:
        if self._affinity.get(session_id) is slot:
            del self._affinity[session_id]
            slot.open_sessions -= 1
            self._session_ttl.pop(session_id, None)

    async def step_session(self, session_id: str, new_token_ids: list[int], params: SamplingParams, *,
                           request_id: Optional[str] = None) -> Trajectory:
        return await self._hop(self._step_session(session_id, new_token_ids, params, request_id))

    async def _step_session(self, session_id, new_token_ids, params, request_id) -> Trajectory:
        if self._weights.inconsistent:
            await self._pick()   # raises UNAVAILABLE
        slot = self._session_slot(session_id)
        rid = self._request_id(request_id)
        self._requests[rid] = slot
        slot.turns_routed += 1
        ttl = self._session_ttl.get(session_id)
        if ttl is not None:
            self._session_ttl[session_id] = (ttl[0], None)          # running: never expired meanwhile
        try:
            return await self._call(slot, "step_session", session_id, new_token_ids, params, rid)
        except RolloutError as e:
            if e.code is ErrorCode.UNKNOWN_SESSION:   # expired on the worker (TTL)
                self._forget_session(session_id, slot)
            raise
        finally:
            self._requests.pop(rid, None)
            if ttl is not None and session_id in self._session_ttl:
                self._session_ttl[session_id] = (ttl[0], time.monotonic())

    async def close_session(self, session_id: str) -> Trajectory:
        return await self._hop(self._close_session(session_id))

    async def _close_session(self, session_id) -> Trajectory:
        slot = self._session_slot(session_id)
        try:
            return await self._call(slot, "close_session", session_id)
        finally:
            self._forget_session(session_id, slot)

    async def run_episode(self, env: str, env_kwargs: dict[str, Any], params: SamplingParams,
                          max_turns: int) -> Trajectory:
        return await self._hop(self._run_episode(env, env_kwargs, params, max_turns))

    async def _run_episode(self, env, env_kwargs, params, max_turns) -> Trajectory:
        slot = await self._pick()
        slot.open_sessions += 1   # an episode holds a session's KV for its whole life
        try:
            return await self._call(slot, "run_episode", env, env_kwargs, params, max_turns)
        finally:
            slot.open_sessions = max(0, slot.open_sessions - 1)

    async def abort(self, request_id: str) -> bool:
        return await self._hop(self._abort(request_id))

    async def _abort(self, request_id) -> bool:
        slot = self._requests.get(request_id)
        return False if slot is None else bool(await self._call(slot, "abort", request_id))

    # ================================================================ weights
    async def update_weights(self, loader: str, loader_kwargs: dict[str, Any], version: Optional[int] = None,
                             mode: str = "keep", kv: str = "keep") -> dict[str, Any]:
        """Build the named loader on every worker and apply it; returns once all are at ``version``
        (default: the pool's current version + 1)."""
        if not isinstance(loader, str) or not isinstance(loader_kwargs, dict):
            raise RolloutError(ErrorCode.BAD_REQUEST, "update_weights needs a loader name and a kwargs dict")
        return await self._hop(self._update(lambda v: WeightSource(v, loader, dict(loader_kwargs)), version, mode, kv))

    async def update_weights_from_state_dict(self, state_dict: Any, version: Optional[int] = None,
                                             mode: str = "keep", kv: str = "keep") -> dict[str, Any]:
        """In-memory weights (a state dict or ``named_parameters()``): put in the object store once, in
        buckets, and read by every worker (``RayObjectLoader``)."""
        from weight_sync import put_state_dict
        refs = await asyncio.get_running_loop().run_in_executor(None, put_state_dict, state_dict)
        return await self._hop(self._update(lambda v: WeightSource(v, refs=refs), version, mode, kv))

    async def _update(self, make_source, version, mode, kv) -> dict[str, Any]:
        async with self._weights.lock:
            source = make_source(self._weights.next_version(version))
            slots = [s for s in self._slots if not s.failed]
            return await self._weights.update(
                slots, source, lambda slot, src: self._call(slot, "update_weights", src, mode, kv))

    @property
    def version(self) -> int:
        return self._weights.version

    @property
    def worker_deaths(self) -> int:
        """Worker deaths the pool has noticed (read from its own state: no call to any worker)."""
        return self._worker_deaths

    # ================================================================ training-loop API (Ray refs, sync)
    def generate_refs(self, prompts: list[list[int]], params: SamplingParams) -> list:
        """One ObjectRef per prompt, each resolving to list[Trajectory] (its ``params.n`` samples); consume
        them with ``ray.get`` or in completion order with ``as_completed``."""
        return self._sync(self._submit_refs("generate", [(p, params) for p in prompts]))

    def run_episodes_refs(self, env: str, env_kwargs_list: list[dict[str, Any]], params: SamplingParams,
                          max_turns: int) -> list:
        """One ObjectRef per episode (server-side agent loops), each resolving to a Trajectory."""
        return self._sync(self._submit_refs("run_episode", [(env, kw, params, max_turns) for kw in env_kwargs_list]))

    async def _submit_refs(self, method: str, arg_lists: list[tuple]) -> list:
        refs = []
        for args in arg_lists:
            slot = await self._pick()
            ref = getattr(slot.actor.handle, method).remote(*args)
            self._track_ref(slot, ref)
            refs.append(ref)
        return refs

    as_completed = staticmethod(as_completed)

    # ================================================================ introspection, shutdown
    async def stats(self) -> dict[str, Any]:
        return await self._hop(self._stats())

    async def _stats(self) -> dict[str, Any]:
        async def one(slot: Slot) -> dict[str, Any]:
            base = {"worker": slot.index, "restarts": slot.restarts, "inflight": slot.actor.inflight,
                    "open_sessions": slot.open_sessions, "sessions_opened": slot.sessions_opened,
                    "turns_routed": slot.turns_routed, "failed": slot.failed, "alive": slot.ready.is_set(),
                    "awaiting_weights": slot.awaiting_weights}
            if slot.live:
                try:
                    base.update(await asyncio.wait_for(self._call(slot, "stats"), 30.0))
                except (RolloutError, asyncio.TimeoutError) as e:
                    base["error"] = str(e)
            return base
        workers = list(await asyncio.gather(*(one(s) for s in self._slots)))
        total: dict[str, Any] = {}
        for w in workers:
            for k, v in w.items():
                if k != "worker" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
        return {"workers": workers, "total": total, "version": self._weights.version,
                "inconsistent": self._weights.inconsistent, "worker_deaths": self._worker_deaths,
                "sessions": len(self._affinity)}

    async def health(self) -> dict[str, Any]:
        return await self._hop(self._health())

    async def _health(self) -> dict[str, Any]:
        async def one(slot: Slot) -> dict[str, Any]:
            # alive: serving (routing picks it); a worker awaiting weights answers but is not alive in that sense
            info = {"worker": slot.index, "alive": False, "restarts": slot.restarts,
                    "awaiting_weights": slot.awaiting_weights, "failed": slot.failed}
            if slot.live:
                try:
                    info.update(await asyncio.wait_for(self._call(slot, "ready"), 10.0), alive=slot.ready.is_set())
                except (RolloutError, asyncio.TimeoutError):
                    pass
            return info
        workers = list(await asyncio.gather(*(one(s) for s in self._slots)))
        ok = not self._closing and not self._weights.inconsistent and all(w["alive"] for w in workers)
        return {"ok": ok, "workers": workers, "version": self._weights.version}

    async def shutdown(self) -> None:
        if self._thread.is_alive():
            await self._hop(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)

    def close(self) -> None:
        """Synchronous ``shutdown`` (for training loops without asyncio)."""
        if self._thread.is_alive():
            self._sync(self._shutdown(), timeout=60)
            self._loop.call_soon_threadsafe(self._loop.stop)

    async def _shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group
        if self._closing:
            return
        self._closing = True
        self._refresher.cancel()
        live = [s for s in self._slots if not s.actor.death.done()]
        await asyncio.gather(*(asyncio.wait_for(s.actor.handle.shutdown.remote(), 15.0) for s in live),
                             return_exceptions=True)
        for s in self._slots:
            s.actor.death.cancel()   # wake anything still waiting: the pool is gone
            try:
                ray.kill(s.actor.handle, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        remove_placement_group(self._pg)

"""``RolloutPool``: N ``RolloutWorker`` actors behind one ``RolloutBackend``, placed through a Ray placement
group (one bundle per worker: ``{"CPU": c}`` or ``{"CPU": c, "GPU": g}``; "PACK" or "SPREAD" over nodes).

Colocated with a trainer (veRL's "hybrid engine"): ``num_gpus_per_worker`` < 1 lets a worker share a GPU (with
the trainer, which Ray does not schedule, or with other workers); the trainer finds the shared GPU by UUID
(``worker_info[i]["gpu_uuid"]``, ``colocated_with``), pushes weights through CUDA IPC
(``update_weights_from_ipc``, or ``rollout.weight_push.WeightPusher``) and has the engines release their memory
while it trains (``sleep`` / ``wake_up``). ``EngineConfig.gpu_memory_utilization`` bounds everything in use on
the device when the engine starts, the trainer's memory included, so leave the trainer its room there. An IPC
update reaches each worker on the pool's node over its fast channel (``rollout.fast_channel``: ZeroMQ on a socket
private to the OS user, no Ray actor call), through Ray where a worker has none or with ``fast_channel=False``.

Threading: the pool's state (routing counters, the session affinity map, the weight source) has one owner,
a private asyncio loop on a background thread. Async methods hop onto it, so they work from any event loop;
the synchronous training-loop API (``generate_refs``, ``run_episodes_refs``) hops onto it too.

Routing: a new session or request goes to the least loaded serving worker, by the pool's own counters
(calls in flight + open sessions, then free KV blocks from the last load snapshot; no RPC per request);
every later turn of a session goes to the worker that opened it (affinity map).

Streaming (``rollout.pool_streams``): ``generate_stream`` / ``step_session_stream`` carry a worker's per-step
deltas (a Ray streaming generator) to the caller's event loop as they come.

Weights (``rollout.pool_updates``): ``update_weights`` (a registered loader by name),
``update_weights_from_state_dict`` (the object store) and ``update_weights_from_distributed`` (a trainer's
broadcast through the pool's weight-sync group, ``rollout.weight_group``) run on every worker concurrently
and return once all of them reached the new version: one barrier, whose outcomes (all, none, or some: the
pool then refuses work) are in ``rollout.pool_weights``. The pool keeps the last complete source to reload
a restarted worker; one that cannot reload it (a broadcast, or a path whose bytes changed since) is held
out of routing until the next update lands on it.

Faults (``rollout.pool_supervisor``): a worker's death is noticed by the calls waiting on it or by the watch
every actor keeps open (so a worker that dies idle is not routed to); its requests fail at once with
WORKER_DIED, its sessions are forgotten (later turns get UNKNOWN_SESSION), and a new actor starts in the same
bundle and loads the current weights before it takes requests. Refs handed out by ``generate_refs`` raise
Ray's own error; ``as_completed`` turns it into ``RolloutError(WORKER_DIED)``.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Optional

from engine.config import EngineConfig
from engine.sampling import SamplingParams
from rollout.backend import ErrorCode, RolloutError, gather_or_cancel
from rollout.fast_channel_client import FastChannels
from rollout.pool_slots import Incarnation, Slot, as_completed, default_runtime_env, gpus_per_worker
from rollout.pool_status import PoolStatusAPI
from rollout.pool_streams import PoolStreamsAPI
from rollout.pool_supervisor import Supervisor
from rollout.pool_updates import PoolWeightsAPI
from rollout.pool_weights import WeightState
from rollout.trajectory import Trajectory
from rollout.weight_group import WeightGroups
from rollout.worker import RolloutWorker
from weight_sync.distributed import backend_for

PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# past a session's TTL, before the pool forgets it (its worker expired it by then: an idle worker checks TTLs every
# rollout.engine_loop.TTL_POLL_S); the default of RolloutPool(session_expiry_grace_s=...)
SESSION_EXPIRY_GRACE_S = 5.0


class RolloutPool(PoolWeightsAPI, PoolStreamsAPI, PoolStatusAPI):
    def __init__(self, engine_config: EngineConfig, num_workers: int, *, placement: str = "PACK",
                 address: Optional[str] = None, num_cpus_per_worker: float = 1.0, env_threads: int = 4,
                 runtime_env: Optional[dict[str, Any]] = None, start_timeout_s: float = 300.0,
                 load_refresh_s: float = 1.0, num_gpus_per_worker: Optional[float] = None,
                 fast_channel: bool = True, session_expiry_grace_s: float = SESSION_EXPIRY_GRACE_S) -> None:
        import ray
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.engine_config = engine_config
        self.num_workers = num_workers
        self._gpu = engine_config.device.startswith("cuda")
        self._gpus = gpus_per_worker(num_gpus_per_worker, engine_config.device)
        if not ray.is_initialized():
            ray.init(address=address, runtime_env=runtime_env or default_runtime_env(), include_dashboard=False)
        # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES: inside, the engine's device is plain "cuda".
        self._worker_config = dataclasses.replace(engine_config, device="cuda") if self._gpu else engine_config
        self._cpus = float(num_cpus_per_worker)
        self._env_threads = env_threads
        self._start_timeout_s = start_timeout_s
        self._load_refresh_s = load_refresh_s
        self._session_expiry_grace_s = float(session_expiry_grace_s)
        self._slots: list[Slot] = []
        self._affinity: dict[str, Slot] = {}          # session id -> its worker
        # session id -> (ttl_s, idle since: monotonic time its last turn ended, None while a turn runs). A session
        # idle past its TTL (+ grace) has been expired by its worker: forget it here too (a vanished client never
        # closes it, and its affinity entry would count as load forever).
        self._session_ttl: dict[str, tuple[float, Optional[float]]] = {}
        self._requests: dict[str, Slot] = {}          # request id in flight -> its worker
        self._ids = itertools.count()
        self._weights = WeightState()
        # IPC weight updates over ZeroMQ to the workers on this node (rollout.fast_channel); None: through Ray
        self._fast_channel = fast_channel
        self._fast = FastChannels(ray.get_runtime_context().get_node_id()) if fast_channel else None
        self._closing = False
        self._loop = asyncio.new_event_loop()
        self._workers = Supervisor(self._loop, self._spawn, self._weights, start_timeout_s, self._forget_worker)
        self._call = self._workers.call
        self._groups = WeightGroups(f"rollout-pool-{uuid.uuid4().hex[:8]}", self._call,
                                    backend_for("cuda" if self._gpu else "cpu"))
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

    def _spawn(self, index: int) -> Any:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        actor_cls = ray.remote(RolloutWorker)
        return actor_cls.options(
            num_cpus=self._cpus, num_gpus=self._gpus, max_concurrency=1000, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=index),
        ).remote(self._worker_config, index, self._env_threads, self._fast_channel)

    async def _start(self, placement: str) -> None:
        from ray.util.placement_group import placement_group
        bundle = {"CPU": self._cpus, **({"GPU": self._gpus} if self._gpu else {})}
        self._pg = placement_group([dict(bundle) for _ in range(self.num_workers)], strategy=placement)
        try:
            await asyncio.wait_for(self._pg.ready(), self._start_timeout_s)
        except asyncio.TimeoutError:
            raise RolloutError(ErrorCode.UNAVAILABLE, f"the cluster cannot place {self.num_workers} x {bundle} "
                                                      f"({placement}) within {self._start_timeout_s} s") from None
        await self._workers.start(self.num_workers)
        self._slots = self._workers.slots
        self._refresher = self._loop.create_task(self._refresh_loads())

    @property
    def worker_info(self) -> list[dict[str, Any]]:
        """Every worker's ``ready()`` (index, pid, node, GPU UUID, fast-channel address) as its current actor answered
        it: a restarted worker's are its new actor's."""
        return [s.actor.info for s in self._slots]

    async def _refresh_loads(self) -> None:
        """Free-KV snapshots for routing: one tiny call per worker per period, not one per request."""
        while not self._closing:
            await asyncio.sleep(self._load_refresh_s)
            self._forget_expired_sessions()
            for s in self._slots:
                if s.ready.is_set() and not s.actor.death.done():
                    try:
                        s.load = await asyncio.wait_for(s.actor.handle.load.remote(), 5.0)
                    except Exception:  # noqa: BLE001 - deaths are noticed by the calls and the watch (pool_supervisor)
                        pass

    def _forget_expired_sessions(self) -> None:
        now = time.monotonic()
        for sid, (ttl, idle_since) in list(self._session_ttl.items()):
            if idle_since is not None and now - idle_since > ttl + self._session_expiry_grace_s:
                slot = self._affinity.get(sid)
                if slot is not None:
                    self._forget_session(sid, slot)
                self._session_ttl.pop(sid, None)

    def _forget_worker(self, slot: Slot, actor: Incarnation) -> None:
        """The pool's bookkeeping for a dead worker: its sessions are gone (their later turns get
        UNKNOWN_SESSION), a weight-sync group it was in cannot be used again, its fast channel is closed."""
        for sid in [sid for sid, s in self._affinity.items() if s is slot]:
            del self._affinity[sid]
            self._session_ttl.pop(sid, None)
        slot.open_sessions = 0
        self._groups.member_lost(slot, actor)
        if self._fast is not None:
            self._fast.forget(actor)

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
        async with self._session_turn(session_id, request_id) as (slot, rid):
            return await self._call(slot, "step_session", session_id, new_token_ids, params, rid)

    @contextlib.asynccontextmanager
    async def _session_turn(self, session_id: str, request_id: Optional[str]) -> AsyncIterator[tuple[Slot, str]]:
        """The bookkeeping of one turn of a session (its worker, request id, TTL clock), on the pool's loop."""
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
            yield slot, rid
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

    # ================================================================ training-loop API (Ray refs, sync)
    def generate_refs(self, prompts: list[list[int]], params: SamplingParams) -> list:
        """One ObjectRef per prompt, each resolving to list[Trajectory] (its ``params.n`` samples); consume
        them with ``ray.get`` or in completion order with ``as_completed``."""
        return self._sync(self._submit_refs("generate", [(p, params) for p in prompts]))

    def run_episodes_refs(self, env: str, env_kwargs_list: list[dict[str, Any]], params: SamplingParams,
                          max_turns: int) -> list:
        """One ObjectRef per episode (server-side agent loops), each resolving to a Trajectory. Each worker gets
        its share in one ``start_episodes`` call first, so the episodes enter its engine together
        (``rollout.prestarts``); the refs are the per-episode calls that collect them."""
        return self._sync(self._submit_episodes(env, env_kwargs_list, params, max_turns))

    async def _submit_refs(self, method: str, arg_lists: list[tuple]) -> list:
        refs = []
        for args in arg_lists:
            slot = await self._pick()
            ref = getattr(slot.actor.handle, method).remote(*args)
            self._workers.track_ref(slot, ref)
            refs.append(ref)
        return refs

    async def _submit_episodes(self, env: str, env_kwargs_list: list[dict[str, Any]], params: SamplingParams,
                               max_turns: int) -> list:
        slots = await self._route(len(env_kwargs_list))
        batch = f"episodes-{uuid.uuid4().hex[:12]}"
        shares: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        for i, (slot, kw) in enumerate(zip(slots, env_kwargs_list)):
            shares.setdefault(slot.index, []).append((f"{batch}-{i}", kw))
        # NOTE: before the per-episode calls, so that Ray (in submission order, as a rule) delivers it first. Its
        # ref is not kept: if it fails or comes late, each episode's own call starts it.
        for index, share in shares.items():
            self._slots[index].actor.handle.start_episodes.remote(env, share, params, max_turns)
        refs = []
        for i, (slot, kw) in enumerate(zip(slots, env_kwargs_list)):
            ref = slot.actor.handle.run_episode.remote(env, kw, params, max_turns, f"{batch}-{i}")
            self._workers.track_ref(slot, ref)
            refs.append(ref)
        return refs

    async def _route(self, n: int) -> list[Slot]:
        """The workers of ``n`` new requests sent at once: each to the least loaded, counting those before it."""
        await self._pick()                 # raises (or waits for a restart) when no worker serves
        ready = [s for s in self._slots if s.ready.is_set()]
        assigned = dict.fromkeys(range(len(self._slots)), 0)
        slots = []
        for _ in range(n):
            slot = min(ready, key=lambda s: s.key(assigned[s.index]))
            assigned[slot.index] += 1
            slots.append(slot)
        return slots

    as_completed = staticmethod(as_completed)

    # ================================================================ sleep (colocated with a trainer)
    async def sleep(self, level: int = 1) -> list[dict[str, Any]]:
        """Every worker releases its device memory (``LLMEngine.sleep``: level 1 the KV cache, level 2 the
        weights too) once its running work finished; requests sent meanwhile wait on their worker until
        ``wake_up``. Returns each worker's report (freed bytes, sessions moved to the host)."""
        return await self._hop(self._on_every_worker("sleep", level))

    async def wake_up(self) -> list[dict[str, Any]]:
        """Every worker takes its memory back (with ``fixed_address_memory`` at the same addresses, the CUDA graphs
        kept; ``engine.sleep``). After ``sleep(2)`` push weights
        (``update_weights*``) before sending work: until then the workers refuse it."""
        return await self._hop(self._on_every_worker("wake_up"))

    async def _on_every_worker(self, method: str, *args: Any) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self._call(slot, method, *args) for slot in self._slots if slot.live)))

    # ================================================================ shutdown (stats, health: rollout.pool_status)
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
        from ray.util.placement_group import remove_placement_group
        if self._closing:
            return
        self._closing = True
        self._refresher.cancel()
        self._groups.invalidate("the pool shut down", tell_members=False)
        await self._workers.stop()
        if self._fast is not None:
            self._fast.close()
        remove_placement_group(self._pg)

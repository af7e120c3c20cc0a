"""``RolloutWorker``: one engine (an ``EngineLoop``) inside a Ray actor.

The class is plain Python; ``RolloutPool`` wraps it with ``ray.remote`` at creation time (so importing this
module needs no running Ray) as an asyncio actor with a high ``max_concurrency``: every method only enqueues
a command on the loop and awaits its future, so a call returns as soon as its own result exists and never
holds up the others. ``num_gpus=1`` when the engine runs on CUDA (Ray sets ``CUDA_VISIBLE_DEVICES``, so the
engine inside uses ``"cuda"``), else CPU only.

A batch of episodes from ``RolloutPool.run_episodes_refs`` arrives as one ``start_episodes`` call that starts them
all, then one ``run_episode(..., prestart_key)`` call per episode that collects it (``rollout.prestarts``: started
by their own calls, which the actor takes in one at a time while the engine thread steps, a batch's episodes
entered the engine over many steps).

Errors leave the actor as ``WorkerError`` (picklable: code and message as its args); the pool turns them
back into ``RolloutError``. A trajectory carries ``metrics["worker"]`` = the index of the worker that made it.

CUDA IPC weight updates also come in over the worker's fast channel (``rollout.fast_channel``: a ZeroMQ socket
private to this OS user, served by its own thread; its address in ``ready()["fast_address"]``) and run the same
code as ``update_weights`` (``_update``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass, field
from collections.abc import AsyncIterator
from typing import Any, Optional

import torch

from engine.config import EngineConfig
from engine.sampling import SamplingParams
from rollout.backend import ErrorCode, RolloutError
from rollout.engine_loop import EngineLoop
from rollout.loop_streams import SampleDelta, iterate_deltas
from rollout.prestarts import Prestarts
from rollout.trajectory import Trajectory
from rollout.weight_group import GroupMembership

logger = logging.getLogger(__name__)


class WorkerError(Exception):
    """A ``RolloutError`` on its way out of an actor (``RolloutError`` itself does not survive pickling)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def to_rollout_error(self) -> RolloutError:
        return RolloutError(ErrorCode(self.code), self.message)


@dataclass(frozen=True)
class WeightSource:
    """Where the current weights came from, so a restarted worker can load them again: a registered
    loader by name (e.g. a safetensors path) or the object refs of an in-memory update. A CUDA IPC payload
    (``ipc``: the trainer's buffers, refilled by its next update) or none of them (a broadcast through the
    pool's weight-sync group) cannot be replayed."""
    version: int
    loader: Optional[str] = None                           # weight_sync registry name
    loader_kwargs: dict[str, Any] = field(default_factory=dict)
    refs: Optional[list] = None                            # put_state_dict's refs (manifest first)
    # The content digest (weight_sync.digest) of what the workers read from loader + loader_kwargs, recorded by
    # the pool once they agreed; a replay must read the same bytes or it is refused. None: not recorded yet
    # (the first read), or refs (object-store objects never change).
    digest: Optional[str] = None
    ipc: Optional[Any] = None                              # weight_sync.CudaIpcPayload (handles, no tensors)

    @property
    def replayable(self) -> bool:
        return self.ipc is None and (self.refs is not None or self.loader is not None)

    @property
    def transport(self) -> str:
        if self.ipc is not None:
            return "CUDA IPC"
        return "the object store" if self.refs is not None else (self.loader or "the weight-sync group")

    def make_loader(self) -> Any:
        from weight_sync import CudaIpcLoader, RayObjectLoader, digesting, get_loader
        if self.ipc is not None:
            return CudaIpcLoader(self.ipc)        # this process's index of the sender's GPU: by its UUID
        if self.refs is not None:
            return RayObjectLoader(self.refs)
        if self.loader is None:
            raise ValueError(f"version {self.version} came through the weight-sync group and cannot be replayed")
        return digesting(get_loader(self.loader, **self.loader_kwargs), expected=self.digest)


class RolloutWorker:
    def __init__(self, engine_config: EngineConfig, worker_index: int, env_threads: int = 4,
                 fast_channel: bool = True) -> None:
        self.index = worker_index
        self.loop = EngineLoop(engine_config, env_threads=env_threads)
        self._prestarts = Prestarts()            # episodes started by start_episodes, by key
        self.weight_group = GroupMembership(self.loop.engine.device)
        self.fast = self._start_fast_channel() if fast_channel else None

    def _start_fast_channel(self) -> Any:
        from rollout.fast_channel import FastChannelServer
        try:
            return FastChannelServer(self._fast_update, name=f"worker-{self.index}")
        except Exception as e:  # noqa: BLE001 - e.g. a socket path too long: updates still come through Ray
            logger.warning("worker %d has no fast channel (%s: %s); IPC updates go through Ray", self.index,
                           type(e).__name__, e)
            return None

    def _fast_update(self, update: Any) -> "concurrent.futures.Future[dict[str, Any]]":
        """The fast channel's handler (on its thread): a ``rollout.fast_channel.FastUpdate``, applied as
        ``update_weights`` applies a ``WeightSource`` of the same payload."""
        return self._update(WeightSource(update.version, ipc=update.payload), update.mode, update.kv)

    async def _await(self, fut) -> Any:
        try:
            return await asyncio.wrap_future(fut)
        except RolloutError as e:
            raise WorkerError(e.code.value, e.message) from None

    def _stamp(self, traj: Trajectory) -> Trajectory:
        traj.metrics["worker"] = self.index
        return traj

    async def ready(self) -> dict[str, Any]:
        import ray
        return {"worker": self.index, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "version": self.loop.engine.weight_version, "gpu_uuid": self._gpu_uuid(),
                "fast_address": self.fast.address if self.fast is not None else None}

    def _gpu_uuid(self) -> Optional[str]:
        """The UUID of the engine's GPU (None on CPU): how a trainer finds out whether it shares it."""
        device = self.loop.engine.device
        if device.type != "cuda":
            return None
        from weight_sync.cuda_ipc import gpu_uuid
        return gpu_uuid(device.index if device.index is not None else torch.cuda.current_device())

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: Optional[str] = None) -> list[Trajectory]:
        return [self._stamp(t) for t in await self._await(self.loop.generate(prompt_ids, params, request_id))]

    async def generate_stream(self, prompt_ids: list[int], params: SamplingParams,
                              request_id: Optional[str] = None) -> AsyncIterator[SampleDelta]:
        """``generate`` as a Ray streaming generator (the pool calls it with ``num_returns="streaming"``): the
        engine loop's deltas after every step. Cancelling the task (``ray.cancel``) aborts the request."""
        async for delta in self._deltas(
                lambda on_delta: self.loop.generate(prompt_ids, params, request_id, on_delta=on_delta), params.n):
            yield delta

    async def step_session_stream(self, session_id: str, new_token_ids: list[int], params: SamplingParams,
                                  request_id: Optional[str] = None) -> AsyncIterator[SampleDelta]:
        async for delta in self._deltas(
                lambda on_delta: self.loop.step_session(session_id, new_token_ids, params, request_id,
                                                        on_delta=on_delta), 1):
            yield delta

    async def _deltas(self, start, num_samples: int) -> AsyncIterator[SampleDelta]:
        try:
            async for delta in iterate_deltas(start, num_samples):
                if delta.final is not None:
                    self._stamp(delta.final)
                yield delta
        except RolloutError as e:
            raise WorkerError(e.code.value, e.message) from None

    async def open_session(self, session_id: Optional[str] = None, ttl_s: Optional[float] = None) -> str:
        return await self._await(self.loop.open_session(session_id, ttl_s))

    async def step_session(self, session_id: str, new_token_ids: list[int], params: SamplingParams,
                           request_id: Optional[str] = None) -> Trajectory:
        return self._stamp(await self._await(self.loop.step_session(session_id, new_token_ids, params, request_id)))

    async def close_session(self, session_id: str) -> Trajectory:
        return self._stamp(await self._await(self.loop.close_session(session_id)))

    async def run_episode(self, env: str, env_kwargs: dict[str, Any], params: SamplingParams,
                          max_turns: int, prestart_key: Optional[str] = None) -> Trajectory:
        """``prestart_key``: the episode may have been started already by ``start_episodes`` under this key
        (then this call only collects it; otherwise it starts it, as without a key)."""
        fut = self._prestarts.take(prestart_key) if prestart_key is not None else None
        if fut is None:
            fut = self.loop.run_episode(env, env_kwargs, params, max_turns)
        return self._stamp(await self._await(fut))

    async def start_episodes(self, env: str, keyed_kwargs: list[tuple[str, dict[str, Any]]], params: SamplingParams,
                             max_turns: int) -> None:
        """Start a batch of episodes now, in one call, so they enter the engine together; each one's result comes
        from its own ``run_episode(..., prestart_key=key)`` call (``rollout.prestarts``)."""
        for key, env_kwargs in keyed_kwargs:
            self._prestarts.start(key, lambda kw=env_kwargs: self.loop.run_episode(env, kw, params, max_turns))

    async def abort(self, request_id: str) -> bool:
        return await self._await(self.loop.abort(request_id))

    async def sleep(self, level: int) -> dict[str, Any]:
        return {"worker": self.index, **await self._await(self.loop.sleep(level))}

    async def wake_up(self) -> dict[str, Any]:
        return {"worker": self.index, **await self._await(self.loop.wake_up())}

    async def update_weights(self, source: WeightSource, mode: str = "keep", kv: str = "keep") -> dict[str, Any]:
        """Apply ``source`` at ``source.version``; the loader is built on the engine thread. The report's
        ``digest`` is the content digest of what was read (None for object refs)."""
        return await self._await(self._update(source, mode, kv))

    def _update(self, source: WeightSource, mode: str, kv: str) -> "concurrent.futures.Future[dict[str, Any]]":
        """The engine loop's update to ``source`` (any thread): its report gets the content digest of what was read
        and the worker's ``timeline`` stamps (``worker_entered`` now, ``worker_returned`` when the engine thread is
        done). Cancelling the Future cancels the update if the engine thread has not taken it yet."""
        entered = time.monotonic()
        made: list[Any] = []

        def make_loader() -> Any:
            made.append(source.make_loader())
            return made[0]
        applied = self.loop.update_weights(make_loader, source.version, mode, kv)
        done: concurrent.futures.Future = concurrent.futures.Future()

        def finish(fut: concurrent.futures.Future) -> None:
            if fut.cancelled():
                done.cancel()
                return
            if not done.set_running_or_notify_cancel():   # cancelled meanwhile (atomic against a cancel)
                return
            if fut.exception() is not None:
                done.set_exception(fut.exception())
                return
            report = fut.result()
            report["digest"] = getattr(made[0], "digest", None) if made else None
            report["timeline"].update(worker_entered=entered, worker_returned=time.monotonic())
            done.set_result(report)
        applied.add_done_callback(finish)
        done.add_done_callback(lambda f: f.cancelled() and applied.cancel())
        return done

    # ---------------------------------------------------------------- the pool's weight-sync group
    async def join_weight_group(self, spec: Any, rank: int, generation: int) -> dict[str, Any]:
        """Join the pool's group ``generation`` as ``rank``; returns once every rank (the trainer too) joined."""
        try:
            await self.weight_group.join(spec, rank, generation)
        except RuntimeError as e:
            raise WorkerError(ErrorCode.UNAVAILABLE.value, str(e)) from None
        return {"worker": self.index, "rank": rank, "generation": generation}

    async def leave_weight_group(self, generation: int) -> None:
        self.weight_group.leave(generation)

    async def update_weights_from_group(self, generation: int, version: int, mode: str = "keep",
                                        kv: str = "keep") -> dict[str, Any]:
        """Receive the trainer's next broadcast on group ``generation`` and apply it at ``version``."""
        loader = self._group_loader(generation, version)
        in_thread = asyncio.get_running_loop().run_in_executor
        try:
            # The trainer may start sending after this call: wait for its header on a thread of the actor, so
            # the engine keeps stepping until the bytes are on their way.
            sent = await in_thread(None, lambda: loader.sent_version)
            if sent is not None and sent != version:
                await in_thread(None, loader.close)           # drained: the trainer's send completes
                raise WorkerError(ErrorCode.UPDATE_FAILED.value, f"the trainer sent version {sent} but the pool "
                                                                 f"applies version {version}; the update was dropped")
            report = await self._await(self.loop.update_weights(lambda: loader, version, mode, kv))
        except WorkerError:
            raise
        except Exception as e:  # noqa: BLE001 - a transport error before the engine took the loader
            raise WorkerError(ErrorCode.UPDATE_FAILED.value, f"weight-sync group generation {generation}: "
                                                             f"{type(e).__name__}: {e}") from None
        finally:
            self.weight_group.settle(loader, generation)
        report["digest"] = None   # a broadcast is not re-read: nothing to compare later
        return report

    async def drain_weight_group(self, generation: int) -> None:
        """Receive the trainer's next broadcast and drop it (the pool refused the update)."""
        loader = self._group_loader(generation)
        try:
            await asyncio.get_running_loop().run_in_executor(None, loader.close)
        except Exception as e:  # noqa: BLE001
            raise WorkerError(ErrorCode.UPDATE_FAILED.value, f"dropping an update failed: {type(e).__name__}: "
                                                             f"{e}") from None
        finally:
            self.weight_group.settle(loader, generation)

    def _group_loader(self, generation: int, version: Optional[int] = None) -> Any:
        try:
            return self.weight_group.loader(generation, version)
        except RuntimeError as e:
            raise WorkerError(ErrorCode.UPDATE_FAILED.value, str(e)) from None

    # ---------------------------------------------------------------- restart, routing, stats
    async def load_state(self, source: Optional[WeightSource]) -> dict[str, Any]:
        """Restart hook: bring a fresh worker to the pool's current weights (no requests are in flight yet)."""
        if source is None or source.version <= self.loop.engine.weight_version:
            return await self.ready()
        await self.update_weights(source, mode="abort", kv="recompute")
        return await self.ready()

    async def watch(self) -> None:
        """Never returns while the actor lives (the one method that does not return promptly, on purpose): the
        pool keeps one such call open per actor, and Ray fails it as soon as the actor dies, so the pool learns
        of a death with no request in flight (an idle dead worker looks least loaded)."""
        await asyncio.Event().wait()

    async def load(self) -> dict[str, Any]:
        """Routing snapshot, answered without going through the engine thread."""
        return dict(self.loop.load_snapshot)

    async def weights_digest(self) -> dict[str, Any]:
        """The engine's parameter digest and version (``EngineLoop.weights_digest``)."""
        return {"worker": self.index, **await self._await(self.loop.weights_digest())}

    async def stats(self) -> dict[str, Any]:
        s = await self._await(self.loop.stats())
        s["worker"] = self.index
        return s

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        self.loop.shutdown()
        if self.fast is not None:
            self.fast.close()

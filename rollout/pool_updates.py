"""``PoolWeightsAPI``: the weight-update half of ``RolloutPool``'s public API, kept apart from routing.

A mixin of ``RolloutPool`` only: it uses the pool's loop plumbing (``_hop``, ``_loop``), its worker calls
(``_call``, ``_slots``), its weight state (``_weights``: ``rollout.pool_weights``) and its weight-sync group
(``_groups``: ``rollout.weight_group``). Every update runs to its end on the pool's loop even when its caller
stops waiting (``_settled``): workers may have applied it already, so the outcome must still be settled.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any, Optional

from rollout.backend import ErrorCode, RolloutError
from rollout.pool_weights import ApplyOne, check_update_policy
from rollout.weight_group import DEFAULT_GROUP_TIMEOUT_S
from rollout.worker import WeightSource
from weight_sync.distributed import WeightSyncGroupSpec

logger = logging.getLogger(__name__)


class PoolWeightsAPI:
    async def update_weights(self, loader: str, loader_kwargs: dict[str, Any], version: Optional[int] = None,
                             mode: str = "keep", kv: str = "keep") -> dict[str, Any]:
        """Build the named loader on every worker and apply it; returns once all are at ``version``
        (default: the pool's current version + 1)."""
        if not isinstance(loader, str) or not isinstance(loader_kwargs, dict):
            raise RolloutError(ErrorCode.BAD_REQUEST, "update_weights needs a loader name and a kwargs dict")
        return await self._hop(self._settled(
            self._update(lambda v: WeightSource(v, loader, dict(loader_kwargs)), version, mode, kv)))

    async def update_weights_from_state_dict(self, state_dict: Any, version: Optional[int] = None,
                                             mode: str = "keep", kv: str = "keep") -> dict[str, Any]:
        """In-memory weights (a state dict or ``named_parameters()``): put in the object store once, in
        buckets, and read by every worker (``RayObjectLoader``)."""
        from weight_sync import put_state_dict
        refs = await asyncio.get_running_loop().run_in_executor(None, put_state_dict, state_dict)
        return await self._hop(self._settled(self._update(lambda v: WeightSource(v, refs=refs), version, mode, kv)))

    async def update_weights_from_ipc(self, payload: Any, version: Optional[int] = None, mode: str = "keep",
                                      kv: str = "keep") -> dict[str, Any]:
        """A colocated trainer's update through CUDA IPC: ``payload`` is ``CudaIpcSender.pack(...)``'s (IPC handles
        and a layout, no tensor bytes); every worker maps the trainer's buffers (kept mapped across updates
        while the sender reuses them) and copies from them on its GPU. Every worker must share the sender's GPU
        (``colocated_with``); one that does not rejects the update with the GPU UUIDs named. ``version``:
        default the payload's, else the pool's + 1. The trainer may refill its buffers (the next ``pack``)
        once this returns. A restarted worker cannot replay IPC handles: it waits for the next update.

        Each worker on the pool's node gets the update over its fast channel (``rollout.fast_channel``: msgpack over
        a ZeroMQ socket only this OS user can open, no Ray actor call), the others through Ray; the report's
        ``channels`` says which carried it ("fast", "ray")."""
        from weight_sync import CudaIpcPayload
        if not isinstance(payload, CudaIpcPayload):
            raise RolloutError(ErrorCode.BAD_REQUEST, f"update_weights_from_ipc needs a CudaIpcPayload "
                                                      f"(CudaIpcSender.pack), got {type(payload).__name__}")
        if version is None:
            version = payload.version
        return await self._hop(self._settled(self._update(lambda v: WeightSource(v, ipc=payload), version, mode,
                                                          kv, self._ipc_apply(payload, mode, kv))))

    def _ipc_apply(self, payload: Any, mode: str, kv: str) -> ApplyOne:
        """WeightState.update's ``apply_one`` for an IPC update: a worker's fast channel when this pool reaches it,
        Ray otherwise (the same worker code runs either way, with the same errors)."""
        wire = None
        if self._fast is not None:
            try:
                wire = payload.to_wire()
            except ValueError as e:   # handles that are not reduce_tensor's: Ray pickles whatever they are
                logger.warning("this IPC payload cannot go over the fast channel (%s): through Ray", e)

        async def apply_one(slot, source: WeightSource) -> dict[str, Any]:
            if wire is not None and self._fast.reachable(slot.actor):
                report = await self._fast.call(slot, {"version": source.version, "mode": mode, "kv": kv,
                                                      "payload": wire})
                return {**report, "channel": "fast"}
            return await self._call(slot, "update_weights", source, mode, kv)
        return apply_one

    def update_weights_from_ipc_blocking(self, payload: Any, version: Optional[int] = None, mode: str = "keep",
                                         kv: str = "keep", timeout_s: Optional[float] = None) -> dict[str, Any]:
        """``update_weights_from_ipc`` for a trainer's thread that is not in an event loop: hands the update to
        the pool's loop and waits for it (no event loop built per call, which cost ~1 ms an update on an H200
        host). ``timeout_s``: stop waiting (the update still settles on the pool's loop)."""
        return self._sync(self.update_weights_from_ipc(payload, version, mode, kv), timeout_s)

    def colocated_with(self, device_uuid: str) -> bool:
        """Whether every worker's engine runs on the GPU ``device_uuid`` (``weight_sync.cuda_ipc.gpu_uuid``):
        the condition for ``update_weights_from_ipc``."""
        uuids = [info.get("gpu_uuid") for info in self.worker_info]
        return bool(uuids) and all(u == device_uuid for u in uuids)

    async def _update(self, make_source, version, mode, kv, apply_one: Optional[ApplyOne] = None) -> dict[str, Any]:
        async with self._weights.lock:
            source = make_source(self._weights.next_version(version))
            slots = [s for s in self._slots if not s.failed]
            return await self._weights.update(
                slots, source, apply_one or (lambda slot, src: self._call(slot, "update_weights", src, mode, kv)))

    @staticmethod
    async def _settled(coro) -> Any:
        """Run an update to its end even if the caller stops waiting (a cancel, a timeout): workers may have
        applied it already, so the pool's version and consistency must still be settled."""
        task = asyncio.ensure_future(coro)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())   # retrieved when nobody awaits it
        return await asyncio.shield(task)

    # ================================================================ weight-sync group (rollout.weight_group)
    async def init_weight_sync_group(self, host: Optional[str] = None, port: Optional[int] = None, *,
                                     backend: Optional[str] = None,
                                     timeout_s: float = DEFAULT_GROUP_TIMEOUT_S) -> WeightSyncGroupSpec:
        """Form a process group of the trainer (rank 0) and every worker (ranks 1..N) for broadcast updates; it
        returns at once with the spec the trainer joins with, ``spec.join(TRAINER_RANK, device)``, while the
        workers wait for it (``timeout_s``, which also bounds every later collective). ``host``: an address of
        the trainer's machine the workers reach (default: this node's IP); ``port``: free there (default: one
        free here). ``backend``: NCCL for workers on CUDA, gloo on the CPU (default). Replaces any earlier group."""
        return await self._hop(self._form_group(host, port, backend, timeout_s))

    async def _form_group(self, host, port, backend, timeout_s) -> WeightSyncGroupSpec:
        async with self._weights.lock:
            return self._groups.form([s for s in self._slots if not s.failed], host, port, backend, timeout_s)

    async def update_weights_from_distributed(self, version: Optional[int] = None, mode: str = "keep",
                                              kv: str = "keep") -> dict[str, Any]:
        """Receive the trainer's next ``DistributedSender.send`` on every worker and apply it with one version
        barrier (call it while the trainer sends). Consumes exactly one send: a refused update (bad version,
        mode or kv) is received and dropped, so the trainer never blocks on it."""
        return await self._hop(self._settled(self._update_from_group(version, mode, kv)))

    def start_update_from_distributed(self, version: Optional[int] = None, mode: str = "keep",
                                      kv: str = "keep") -> "concurrent.futures.Future[dict[str, Any]]":
        """``update_weights_from_distributed`` for synchronous training loops: starts it and returns at once;
        call ``DistributedSender.send``, then ``.result()``."""
        return asyncio.run_coroutine_threadsafe(self._settled(self._update_from_group(version, mode, kv)),
                                                self._loop)

    async def _update_from_group(self, version, mode, kv) -> dict[str, Any]:
        async with self._weights.lock:
            group = await self._groups.ready()
            try:
                version = self._weights.next_version(version)
                check_update_policy(mode, kv)
            except RolloutError:
                await self._groups.drain(group)
                raise
            try:
                return await self._weights.update(group.slots, WeightSource(version), lambda slot, src: self._call(
                    slot, "update_weights_from_group", group.generation, src.version, mode, kv))
            except BaseException as e:
                # Some member may be out of step with the others: only a new group is safe.
                self._groups.invalidate(f"the update to version {version} failed: {getattr(e, 'message', repr(e))}")
                raise

    async def destroy_weight_sync_group(self) -> None:
        """Have every member leave the current group (a trainer still sending on it fails at once)."""
        await self._hop(self._destroy_group())

    async def _destroy_group(self) -> None:
        await asyncio.gather(*self._groups.invalidate("destroyed by destroy_weight_sync_group"))

    @property
    def version(self) -> int:
        return self._weights.version

    @property
    def worker_deaths(self) -> int:
        """Worker deaths the pool has noticed (read from its own state: no call to any worker)."""
        return self._workers.deaths

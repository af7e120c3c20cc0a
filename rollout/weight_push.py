"""``WeightPusher``: the trainer's side of a weight update through a ``RolloutPool``, by the fastest transport the
placement allows.

- ``cuda_ipc``: every worker shares the trainer's GPU (``RolloutPool(num_gpus_per_worker=0.5)``, a colocated
  "hybrid engine"). The trainer packs its parameters into persistent bucket buffers on its GPU, converted to
  the engine's dtype while copying (``CudaIpcSender(cast=...)``), and the pool hands the workers the IPC
  handles only; each engine copies device to device from the mapped buffers. Steady state: no host round trip,
  no pickled tensor, no handle re-opened.
- ``object_store``: anything else (CPU, workers on other GPUs or nodes): the parameters go to host memory in the
  engine's dtype and through the Ray object store in buckets (``update_weights_from_state_dict``).
``auto`` (the default) picks ``cuda_ipc`` when the pool is colocated with the trainer's device, else
``object_store``; asking for ``cuda_ipc`` when it cannot work is a ValueError saying why. (A broadcast to
workers on other GPUs goes through ``pool.init_weight_sync_group`` + ``DistributedSender``: rollout.weight_group.)

Names: what ``push`` is given (``model.named_parameters()`` of a Hugging Face model: tied weights once) is what
the engines receive. ``push`` returns once every worker applied the update (the pool's version barrier), so the
next ``push`` may refill the same IPC buffers.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from weight_sync.base import DEFAULT_BUCKET_BYTES
from weight_sync.buckets import NamedTensors, named_tensor_list

logger = logging.getLogger(__name__)

TRANSPORTS = ("auto", "cuda_ipc", "object_store")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _blocking(call: Callable[[], Any]) -> Any:
    """``call()`` (which waits on the pool's loop) from synchronous code; refused inside a running event loop,
    which the wait would block."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return call()
    raise RuntimeError("WeightPusher.push was called inside a running event loop: await push_async instead")


@dataclass(frozen=True)
class PushReport:
    version: int
    transport: str          # "cuda_ipc" | "object_store"
    seconds: float          # the whole push: pack + every worker's apply (the caller's wait)
    pack_seconds: float     # the trainer's share: copying its weights into the send buffers / host memory
    engine_seconds: float   # the slowest worker's apply inside its engine (validation, copies, synchronize)
    bytes: int              # bytes each worker received (in the engine's dtype)
    num_workers: int
    # Where the push's time went, seconds, from time.monotonic() stamps taken along the way (one clock for every
    # process of the machine; the slowest worker's): "pack", "to_worker" (the pool's hop and the Ray call until
    # the worker's method runs), "to_engine_thread" (until the engine thread takes it, between two steps),
    # "loader" (building the loader: mapping IPC buffers), "apply" (the engine's validation, copies and
    # synchronize, version and KV bookkeeping), "return" (back through Ray to the pool's gather), "pool" (the
    # pool's own settling and the hop back to the caller). Empty where a worker reported no stamps. Through the fast
    # channel, "to_worker" is split further (not adding to the sum): "to_worker_send" (the pool's dispatch up to the
    # channel), "to_worker_wire" (encoding, ZeroMQ, the worker's channel thread waking), "to_worker_decode",
    # "to_worker_handler" (until the worker's update code runs).
    stages: dict = field(default_factory=dict)
    # how the pool's call reached the workers: "fast" (its ZeroMQ channel, rollout.fast_channel) and/or "ray"
    channels: tuple = ()


class WeightPusher:
    def __init__(self, pool: Any, *, transport: str = "auto", device: Optional[torch.device | str] = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        """``device``: the trainer's device holding the weights (default: the current CUDA device when CUDA is
        there, else CPU)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.pool = pool
        self.cast = _DTYPES[pool.engine_config.dtype]
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.transport = self._choose(transport)
        self._sender = None
        if self.transport == "cuda_ipc":
            from weight_sync.cuda_ipc import CudaIpcSender
            self._sender = CudaIpcSender(bucket_bytes=bucket_bytes, device=self.device, cast=self.cast)
        self._bucket_bytes = bucket_bytes
        logger.info("weight pushes go through %s (engine dtype %s)", self.transport, pool.engine_config.dtype)

    def _choose(self, transport: str) -> str:
        colocated, why = self._colocated()
        if transport == "cuda_ipc" and not colocated:
            raise ValueError(f"transport 'cuda_ipc' needs every worker on the trainer's GPU: {why}")
        if transport == "auto":
            return "cuda_ipc" if colocated else "object_store"
        return transport

    def _colocated(self) -> tuple[bool, str]:
        if self.device.type != "cuda":
            return False, f"the trainer's weights are on {self.device}"
        from weight_sync.cuda_ipc import gpu_uuid
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        mine = gpu_uuid(index)
        if not self.pool.colocated_with(mine):
            theirs = [info.get("gpu_uuid") for info in self.pool.worker_info]
            return False, f"the trainer is on GPU {mine}, the workers on {theirs}"
        return True, ""

    def push(self, named_tensors: NamedTensors, version: int, *, mode: str = "keep",
             kv: str = "recompute") -> PushReport:
        """Send ``named_tensors`` as weight ``version`` to every worker; returns once all applied it. ``mode``
        and ``kv``: what happens to requests in flight (``RolloutPool.update_weights``)."""
        start = time.perf_counter()
        if self.transport == "cuda_ipc":
            payload = self._sender.pack(named_tensors, version=version)
            packed = time.perf_counter()
            report = _blocking(lambda: self.pool.update_weights_from_ipc_blocking(
                payload, version=version, mode=mode, kv=kv))
        else:
            state = {name: (t.to("cpu", self.cast) if t.dtype.is_floating_point else t.to("cpu"))
                     for name, t in named_tensor_list(named_tensors)}
            packed = time.perf_counter()
            report = _blocking(lambda: asyncio.run(
                self.pool.update_weights_from_state_dict(state, version=version, mode=mode, kv=kv)))
        end = time.perf_counter()
        return PushReport(version=report["version"], transport=self.transport, seconds=end - start,
                          pack_seconds=packed - start, engine_seconds=float(report.get("engine_seconds", 0.0)),
                          bytes=int(report["num_bytes"]),
                          num_workers=int(report["num_workers"]),
                          stages=_stages(report.get("timeline") or {}, packed - start, end - start),
                          channels=tuple(report.get("channels", ())))

    async def push_async(self, named_tensors: NamedTensors, version: int, *, mode: str = "keep",
                         kv: str = "recompute") -> PushReport:
        """``push`` from a coroutine (the waiting happens on a thread)."""
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.push(named_tensors, version, mode=mode, kv=kv))

    def close(self) -> None:
        """Free the trainer's IPC buffers (after the last push)."""
        if self._sender is not None:
            self._sender.release()


_STAGE_MARKS = (("to_worker", "pool_called", "worker_entered"), ("to_engine_thread", "worker_entered", "engine_taken"),
                ("loader", "engine_taken", "loader_built"), ("apply", "loader_built", "applied"),
                ("return", "applied", "pool_gathered"))


def _stages(timeline: dict, pack_s: float, total_s: float) -> dict:
    """PushReport.stages from the pool's timeline (monotonic stamps): consecutive differences, and "pool" for
    what the stamps leave out of the caller's wait (the hop onto the pool's loop and back, its settling)."""
    if not all(k in timeline for _, a, b in _STAGE_MARKS for k in (a, b)):
        return {}
    stages = {"pack": pack_s, **{name: timeline[b] - timeline[a] for name, a, b in _STAGE_MARKS}}
    stages["pool"] = total_s - sum(stages.values())
    if all(k in timeline for k in _CHANNEL_MARKS):
        # the fast channel's way in, split (not added to the sum: "to_worker" holds it)
        sent, received, decoded = (timeline[k] for k in _CHANNEL_MARKS)
        stages.update(to_worker_send=sent - timeline["pool_called"], to_worker_wire=received - sent,
                      to_worker_decode=decoded - received, to_worker_handler=timeline["worker_entered"] - decoded)
    return stages


_CHANNEL_MARKS = ("channel_sent", "channel_received", "channel_decoded")

"""Broadcast of named tensors from a trainer rank to engines, in a process group of its own.

The group never touches ``torch.distributed``'s default group (a trainer usually has one already): it is built
directly from a ``TCPStore`` and a ``ProcessGroupGloo`` (CPU) / ``ProcessGroupNCCL`` (GPU) backend object, and its
collectives are called on that object, so ``init_process_group`` is neither needed nor disturbed.

Wire sequence of one update (every receiver runs the same collectives in the same order)::

    broadcast int64[1]          manifest length in bytes
    broadcast uint8[len]        manifest (weight_sync.buckets.BucketPlan JSON: name/shape/dtype/bucket/offset)
    broadcast uint8[size_b]     bucket b, for b = 0 .. B-1
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from weight_sync.base import DEFAULT_BUCKET_BYTES, Manifest
from weight_sync.buckets import BucketPlan, NamedTensors, named_tensor_list, pack_bucket, plan_buckets, unpack_bucket


@dataclass
class WeightSyncGroup:
    """A dedicated process group: ``rank`` of ``world_size``, tensors exchanged on ``device``."""

    rank: int
    world_size: int
    device: torch.device
    backend: str               # "gloo" or "nccl"
    pg: object                 # the ProcessGroupGloo / ProcessGroupNCCL backend object
    store: object              # kept alive: the rendezvous store the backend was built on

    def broadcast(self, tensor: torch.Tensor, src: int):
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        return self.pg.broadcast([tensor], opts)


def init_weight_sync_group(host: str, port: int, rank: int, world_size: int, *,
                           device: torch.device | str = "cpu", backend: Optional[str] = None,
                           timeout_s: float = 600.0) -> WeightSyncGroup:
    """Join the weight-sync group at ``host:port`` (rank 0 hosts the store). Every member calls this with the
    same ``host``, ``port`` and ``world_size``. ``backend`` defaults to NCCL for a CUDA ``device``, else gloo."""
    device = torch.device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of {world_size}")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the NCCL backend needs a CUDA device, got {device}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, rank == 0, timeout)
    prefixed = dist.PrefixStore("weight_sync/", store)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    elif backend == "nccl":
        if not dist.is_nccl_available():
            raise RuntimeError("this torch build has no NCCL; use backend='gloo'")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
    else:
        raise ValueError(f"unknown backend {backend!r}; use 'gloo' or 'nccl'")
    return WeightSyncGroup(rank, world_size, device, backend, pg, store)


class DistributedSender:
    """Trainer side: ``send`` broadcasts one update from this rank, bucket by bucket (two buckets in flight,
    so packing bucket b+1 overlaps sending bucket b)."""

    def __init__(self, group: WeightSyncGroup, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.group = group
        self.bucket_bytes = bucket_bytes

    def send(self, named_tensors: NamedTensors, *, version: Optional[int] = None) -> int:
        """Broadcast ``named_tensors`` (a state dict or ``named_parameters()`` with HF names) to every other
        rank; blocks until all buckets are sent. Returns the bytes of tensor data sent."""
        g = self.group
        tensors = named_tensor_list(named_tensors)
        plan = plan_buckets(tensors, self.bucket_bytes, version)
        by_name = dict(tensors)
        manifest = torch.frombuffer(bytearray(plan.to_bytes()), dtype=torch.uint8).to(g.device)
        g.broadcast(torch.tensor([manifest.numel()], dtype=torch.int64, device=g.device), g.rank).wait()
        g.broadcast(manifest, g.rank).wait()
        if not plan.bucket_sizes:
            return 0
        cap = max(plan.bucket_sizes)
        slots = [torch.empty(cap, dtype=torch.uint8, device=g.device) for _ in range(min(2, len(plan.bucket_sizes)))]
        in_flight: list[Optional[object]] = [None] * len(slots)
        for b, size in enumerate(plan.bucket_sizes):
            slot = b % len(slots)
            if in_flight[slot] is not None:
                in_flight[slot].wait()  # the slot's previous bucket has left; safe to overwrite
            buf = slots[slot][:size]
            pack_bucket(plan, b, by_name, buf)
            in_flight[slot] = g.broadcast(buf, g.rank)
        for work in in_flight:
            if work is not None:
                work.wait()
        if g.device.type == "cuda":
            # NOTE: NCCL's wait() only orders streams; block the host too, so "send returned" means "sent" (a
            # trainer that exits or frees its weights right after must not cut the broadcast short).
            torch.cuda.current_stream(g.device).synchronize()
        return sum(e.nbytes for e in plan.entries)


class DistributedLoader:
    """Engine side of one update from ``DistributedSender`` at rank ``src``. Yields views of received bucket
    buffers (on the group's device). ``close`` drains buckets not yet received so the sender never hangs."""

    def __init__(self, group: WeightSyncGroup, *, src: int = 0, version: Optional[int] = None) -> None:
        if src == group.rank:
            raise ValueError(f"rank {src} is the sender; a loader must run on another rank")
        self.group = group
        self.src = src
        self._version = version
        self._plan: Optional[BucketPlan] = None
        self._next_bucket = 0
        self._closed = False

    @property
    def version(self) -> Optional[int]:
        """The version given here, else the sender's (blocks until the sender's manifest arrives)."""
        return self._version if self._version is not None else self._recv_plan().version

    def _recv_plan(self) -> BucketPlan:
        if self._plan is None:
            g = self.group
            length = torch.zeros(1, dtype=torch.int64, device=g.device)
            g.broadcast(length, self.src).wait()
            data = torch.empty(int(length.item()), dtype=torch.uint8, device=g.device)
            g.broadcast(data, self.src).wait()
            self._plan = BucketPlan.from_bytes(data.cpu().numpy().tobytes())
        return self._plan

    def names_and_shapes(self) -> Manifest:
        return self._recv_plan().manifest()

    def _recv_bucket(self) -> torch.Tensor:
        size = self._recv_plan().bucket_sizes[self._next_bucket]
        buf = torch.empty(size, dtype=torch.uint8, device=self.group.device)
        self.group.broadcast(buf, self.src).wait()
        self._next_bucket += 1
        return buf

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        plan = self._recv_plan()
        while self._next_bucket < len(plan.bucket_sizes) and not self._closed:
            b = self._next_bucket
            yield from unpack_bucket(plan, b, self._recv_bucket())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        plan = self._recv_plan()  # the sender broadcasts the manifest in any case
        while self._next_bucket < len(plan.bucket_sizes):
            self._recv_bucket()  # drained, dropped

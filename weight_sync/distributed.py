"""Broadcast of named tensors from a trainer rank to engines, in a process group of its own.

The group never touches ``torch.distributed``'s default group (a trainer usually has one already): it is built
directly from a ``TCPStore`` and a ``ProcessGroupGloo`` (CPU) / ``ProcessGroupNCCL`` (GPU) backend object, and its
collectives are called on that object, so ``init_process_group`` is neither needed nor disturbed.

Wire sequence of one update (every receiver runs the same collectives in the same order)::

    broadcast int64[6]          header: layout length, layout follows (0/1), has version (0/1), version, layout key
                                (two int64 of the 16-byte digest)
    broadcast uint8[len]        layout JSON (weight_sync.buckets.BucketPlan: name/shape/dtype/bucket/offset), only
                                when it differs from the one this sender last sent on this group: a training run
                                sends it once, and every later update costs one small header round trip
    broadcast uint8[size_b]     bucket b, for b = 0 .. B-1

A transport error (a peer that died, a timeout) *breaks* the group: it drops its backend object, which closes its
connections, so the peers' pending collectives fail at once too ("connection closed") instead of waiting out the
timeout; every later use raises at once. A broken group is never repaired: form a new one (a new port).

Both sides keep two bucket-sized buffers per group across updates. The receiver posts the broadcast of bucket b+1
before handing bucket b to the engine, so the engine's copy of b overlaps the transfer of b+1 (stream order keeps
b+1's broadcast after the copy out of the buffer it reuses, bucket b-1's).
"""
from __future__ import annotations

import datetime
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from weight_sync.base import DEFAULT_BUCKET_BYTES
from weight_sync.buckets import BucketedLoader, BucketPlan, NamedTensors, named_tensor_list, pack_bucket, plan_buckets


TRAINER_RANK = 0   # the sender's rank in a trainer <-> engines group (it hosts the rendezvous store)
BACKENDS = ("gloo", "nccl")


@dataclass
class WeightSyncGroup:
    """A dedicated process group: ``rank`` of ``world_size``, tensors exchanged on ``device``."""

    rank: int
    world_size: int
    device: torch.device
    backend: str               # "gloo" or "nccl"
    pg: object                 # the ProcessGroupGloo / ProcessGroupNCCL backend object; None once broken
    store: object              # kept alive: the rendezvous store the backend was built on
    # Persistent state across updates (owned by the sender / loaders of this group, one update at a time).
    layouts: dict = field(default_factory=dict)     # src rank -> the last BucketPlan received from it
    sent_layout_key: Optional[bytes] = None         # the layout this rank last sent
    _slots: dict = field(default_factory=dict)      # role -> two uint8 bucket buffers
    broken: Optional[str] = None                    # why this group can no longer be used (module docstring)

    def broadcast(self, tensor: torch.Tensor, src: int) -> "_Work":
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        pg = self.pg   # NOTE: one read: close() from another thread may clear it
        if self.broken is not None or pg is None:
            raise RuntimeError(f"weight-sync group (rank {self.rank} of {self.world_size}) is broken: "
                               f"{self.broken}; form a new group")
        try:
            return _Work(self, pg.broadcast([tensor], opts))
        except Exception as e:
            self.break_(f"{type(e).__name__}: {e}")
            raise

    def break_(self, reason: str) -> None:
        """Mark the group unusable and drop its backend object (closing its connections, so peers waiting on
        this rank fail at once). Idempotent; the first reason is kept."""
        if self.broken is None:
            self.broken = reason
        self.pg = None
        self.store = None
        self._slots.clear()
        self.layouts.clear()

    def close(self) -> None:
        """Leave the group for good (a trainer moving to a new group, an engine told to leave)."""
        self.break_("closed by this rank")

    def slots(self, role: str, nbytes: int) -> list[torch.Tensor]:
        """Two buffers of at least ``nbytes`` for ``role`` ("send" / "recv"), reused across updates."""
        bufs = self._slots.get(role)
        if bufs is None or bufs[0].numel() < nbytes:
            self._slots.pop(role, None)  # free the old pair before allocating the new one
            bufs = self._slots[role] = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        return bufs


class _Work:
    """A posted collective whose failure breaks its group."""

    def __init__(self, group: WeightSyncGroup, work: Any) -> None:
        self.group, self.work = group, work

    def wait(self) -> None:
        try:
            self.work.wait()
        except Exception as e:
            self.group.break_(f"{type(e).__name__}: {e}")
            raise


_HEADER_LEN = 6


def _key_ints(key: bytes) -> tuple[int, int]:
    return int.from_bytes(key[:8], "little", signed=True), int.from_bytes(key[8:16], "little", signed=True)


def send_layout(group: WeightSyncGroup, plan: BucketPlan, version: Optional[int]) -> None:
    """Broadcast one update's header, and its layout when this rank has not sent this layout before."""
    layout = plan.to_bytes()
    follows = plan.key != group.sent_layout_key
    header = torch.tensor([len(layout), int(follows), int(version is not None), version or 0, *_key_ints(plan.key)],
                          dtype=torch.int64, device=group.device)
    group.broadcast(header, group.rank).wait()
    if follows:
        group.broadcast(torch.frombuffer(bytearray(layout), dtype=torch.uint8).to(group.device), group.rank).wait()
    group.sent_layout_key = plan.key


def backend_for(device: torch.device | str) -> str:
    """The weight-sync backend for tensors on ``device``: NCCL on CUDA, gloo elsewhere."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@dataclass(frozen=True)
class WeightSyncGroupSpec:
    """Everything a member needs to join one weight-sync group (small, picklable: hand it to the trainer
    process). ``join(rank, device)`` is ``init_weight_sync_group`` with these fields."""

    host: str                   # where rank 0 (the trainer) hosts the rendezvous store; reachable by every member
    port: int
    world_size: int             # 1 trainer + the engines
    backend: str                # "gloo" or "nccl"
    timeout_s: float = 600.0    # every rendezvous and collective of the group waits at most this long
    group_name: str = "weight_sync"   # the store's key prefix

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty str, got {self.host!r}")
        for name, value, low in (("port", self.port, 1), ("world_size", self.world_size, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.port > 65535:
            raise ValueError(f"port must be <= 65535, got {self.port}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or \
                not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {self.timeout_s!r}")
        if not isinstance(self.group_name, str) or not self.group_name:
            raise ValueError(f"group_name must be a non-empty str, got {self.group_name!r}")

    def join(self, rank: int, device: torch.device | str | None = None) -> WeightSyncGroup:
        """Join as ``rank`` (the trainer: ``TRAINER_RANK``), exchanging tensors on ``device`` (default: the
        current CUDA device for NCCL, the CPU for gloo). Blocks until every rank has joined."""
        if device is None:
            device = "cuda" if self.backend == "nccl" else "cpu"
        return init_weight_sync_group(self.host, self.port, rank, self.world_size, device=device,
                                      backend=self.backend, timeout_s=self.timeout_s, group_name=self.group_name)


def init_weight_sync_group(host: str, port: int, rank: int, world_size: int, *,
                           device: torch.device | str = "cpu", backend: Optional[str] = None,
                           timeout_s: float = 600.0, group_name: str = "weight_sync") -> WeightSyncGroup:
    """Join the weight-sync group at ``host:port`` (rank 0 hosts the store). Every member calls this with the
    same ``host``, ``port``, ``world_size`` and ``group_name``. ``backend`` defaults to NCCL for a CUDA
    ``device``, else gloo."""
    device = torch.device(device)
    backend = backend or backend_for(device)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank!r} is outside a group of {world_size}")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the NCCL backend needs a CUDA device, got {device}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, rank == 0, timeout)
    prefixed = dist.PrefixStore(f"{group_name}/", store)
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
        send_layout(g, plan, version)   # NOTE: a failed collective breaks the group (module docstring)
        if not plan.bucket_sizes:
            return 0
        slots = g.slots("send", max(plan.bucket_sizes))
        in_flight: list[Optional[object]] = [None, None]
        for b, size in enumerate(plan.bucket_sizes):
            slot = b % 2
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


class DistributedLoader(BucketedLoader):
    """Engine side of one update from ``DistributedSender`` at rank ``src``. Delivers the received buckets
    (``iter_buckets``, the engine's bulk path) or views of them (``iter_tensors``), in the group's persistent
    buffers on its device. ``close`` drains buckets not yet received so the sender never hangs."""

    buckets_resident = False     # buckets arrive one by one: a failure half-way needs the rollback copy
    persistent_buffers = True    # the group's two receive buffers, every update

    def __init__(self, group: WeightSyncGroup, *, src: int = 0, version: Optional[int] = None) -> None:
        if src == group.rank:
            raise ValueError(f"rank {src} is the sender; a loader must run on another rank")
        self.group = group
        self.src = src
        self._version = version
        self._sent_version: Optional[int] = None
        self._plan: Optional[BucketPlan] = None
        self._posted: deque = deque()   # (bucket, buffer, work) broadcasts posted, not yet handed out
        self._next_post = 0
        self._closed = False

    @property
    def version(self) -> Optional[int]:
        """The version given here, else the sender's (blocks until the sender's header arrives)."""
        if self._version is not None:
            return self._version
        return self.sent_version

    @property
    def sent_version(self) -> Optional[int]:
        """The version in the sender's header, None if it sent none (blocks until the header arrives)."""
        self._recv_plan()
        return self._sent_version

    def _recv_plan(self) -> BucketPlan:
        if self._plan is None:
            g = self.group
            header = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=g.device)
            g.broadcast(header, self.src).wait()
            length, follows, has_version, version, k0, k1 = header.tolist()
            self._sent_version = version if has_version else None
            if follows:
                data = torch.empty(length, dtype=torch.uint8, device=g.device)
                g.broadcast(data, self.src).wait()
                g.layouts[self.src] = BucketPlan.from_bytes(data.cpu().numpy().tobytes())
            plan = g.layouts.get(self.src)
            if plan is None or _key_ints(plan.key) != (k0, k1):
                # Every rank takes part in every update, so this cannot happen short of a protocol bug; the bucket
                # sizes are unknown, so the sender cannot be drained either.
                g.break_("out of step: an update for a layout this rank never received")
                raise RuntimeError(f"weight sync: rank {self.src} sent an update for a layout this rank never "
                                   f"received; the group is out of step and must be rebuilt")
            self._plan = plan
        return self._plan

    def bucket_plan(self) -> BucketPlan:
        return self._recv_plan()

    def _post(self) -> None:
        plan = self._recv_plan()
        b = self._next_post
        size = plan.bucket_sizes[b]
        buf = self.group.slots("recv", max(plan.bucket_sizes))[b % 2][:size]
        self._posted.append((b, buf, self.group.broadcast(buf, self.src)))
        self._next_post += 1

    def iter_buckets(self) -> Iterator[tuple[int, torch.Tensor]]:
        n = len(self._recv_plan().bucket_sizes)
        if self._next_post == 0 and n:
            self._post()
        while self._posted and not self._closed:
            b, buf, work = self._posted.popleft()
            work.wait()               # the engine's stream (NCCL) / the host (gloo) waits for bucket b
            if self._next_post < n:
                self._post()          # bucket b+1 into the other buffer while the engine copies b
            yield b, buf

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.group.broken is not None:
            return   # nothing left to drain: the group's connections are closed, the sender has failed too
        n = len(self._recv_plan().bucket_sizes)  # the sender broadcasts the header in any case
        while self._posted or self._next_post < n:
            if not self._posted:
                self._post()
            self._posted.popleft()[2].wait()   # drained, dropped

"""Host copies of KV blocks: offloaded idle sessions and swapped-out sequences (the scheduler decides, this
moves bytes), off the engine thread's critical path.

    host: [num_host_blocks, 2 * num_layers, block_size, num_kv_heads, head_dim]   pinned on CUDA

Block-major, so one host block of every layer's K and V is contiguous and a run of consecutive host
blocks moves in one copy. Per step (``SchedulerOutput``), in the order the scheduler's copy contract asks
(reads before writes, ``scheduler.kv_offload``):

    main stream:  gather the swap-out device blocks into a staging buffer   (1 kernel over all layers)
                  (the step's block copies and forward follow on this stream)
    copy stream:  wait for the main stream up to here, then
                  swap-ins   host runs -> device staging (async, pinned) -> one scatter into the KV caches
                  swap-outs  staging -> host runs (async, pinned)
                  record an event: the step's restores have landed once it completes

One copy stream: restores first (they are waited for), offloads after; host blocks a restore reads are read
before an offload of the same step overwrites them, and later steps' copies queue behind earlier ones.
(Measured on an H200: a second stream so the two directions overlap made the decode steps running beside
them slower — 1.15x instead of 1.05x at a quarter session a step on the 8B shape — though the copies alone
finished sooner.)

The engine thread never waits on these copies: a restored sequence is scheduled only after ``poll``
reports its event complete, and nothing else reads or writes the blocks in flight (the scheduler holds a
restore's blocks until it lands; a freed offload block is only reused by work queued after the gather on
the main stream, or by a copy-stream write ordered after it). On CPU every copy is synchronous and
``poll`` reports restores at once.
"""
from __future__ import annotations

import logging
import weakref
from collections import deque

import torch

from engine.kv_cache import kv_storage
from engine.sampling import upload_nonblocking

logger = logging.getLogger(__name__)


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(start index, first id, length) of each run of consecutive ids in ``ids`` (already sorted)."""
    runs = []
    i = 0
    while i < len(ids):
        j = i + 1
        while j < len(ids) and ids[j] == ids[j - 1] + 1:
            j += 1
        runs.append((i, ids[i], j - i))
        i = j
    return runs


def available_host_memory() -> int:
    """Bytes of host memory available now (MemAvailable on Linux; physical pages free elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _pinned_empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A page-locked host tensor of exactly this size: registered with the driver (the caching host
    allocator behind ``pin_memory=True`` rounds a request up to a power of two, which for a pool of tens of
    GB wastes as much again), falling back to ``pin_memory=True`` where registration is refused."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return t
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(t.data_ptr(), nbytes, 0)
    if int(err) != 0:
        logger.warning("cudaHostRegister of %.1f GB failed (%s): pinning through the caching allocator",
                       nbytes / 1e9, err)
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
    return t


class HostKVCache:
    def __init__(self, device_caches: list[tuple[torch.Tensor, torch.Tensor]], num_host_blocks: int) -> None:
        self.layers = [c for pair in device_caches for c in pair]   # 2L tensors [num_blocks, bs, Hkv, D]
        self.storage = kv_storage(device_caches)                    # [2L, num_blocks, bs, Hkv, D] or None
        k0 = self.layers[0]
        self.device = k0.device
        self.num_blocks = num_host_blocks
        shape = (num_host_blocks, len(self.layers)) + tuple(k0.shape[1:])
        self.cuda = k0.is_cuda
        self.host = _pinned_empty(shape, k0.dtype) if self.cuda else torch.empty(shape, dtype=k0.dtype)
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._inflight: deque[tuple[torch.cuda.Event, list[int], list]] = deque()   # (done, restores, keep-alive)
        self._landed: list[int] = []     # CPU: restores complete at once
        self.bytes_moved = 0

    def bind(self, device_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The device KV tensors are back (a wake: new ones, or at fixed addresses the same ones mapped again):
        copy to and from these."""
        self.wait_all()
        self.layers = [c for pair in device_caches for c in pair]
        self.storage = kv_storage(device_caches)

    def unbind(self) -> None:
        """The device KV tensors are being released (a sleep): drop every reference to them (``bind`` again at
        wake). Allocated by torch, a reference kept would keep their memory allocated; at fixed addresses
        (``engine.device_memory``) their memory is unmapped whatever holds them, and this keeps any copy from
        reaching it while it is (which would fault)."""
        self.wait_all()
        self.layers = []
        self.storage = None

    def wait_all(self) -> None:
        """Block until every copy in flight completed (their restores are still reported by ``poll``)."""
        if self._inflight:
            self._inflight[-1][0].synchronize()
        self._prune()

    @property
    def block_bytes(self) -> int:
        return self.host[0].numel() * self.host.element_size()

    # ------------------------------------------------------------------ per step
    def gather(self, swap_out: list[tuple[int, int]]):
        """Read the swap-out device blocks (main stream, before anything of the step writes). -> handle for
        ``copy``."""
        if not swap_out:
            return None
        pairs = sorted(swap_out, key=lambda p: p[1])          # host order: consecutive ids copy as one run
        dev = upload_nonblocking([d for d, _ in pairs], torch.int64, self.device)
        if self.storage is not None:   # one gather over every layer, written block-major in the same kernel
            staged = self.storage.transpose(0, 1).index_select(0, dev)   # [n, 2L, bs, Hkv, D], contiguous
        else:
            staged = torch.stack([c.index_select(0, dev) for c in self.layers], dim=1)
        return staged, [h for _, h in pairs]

    def copy(self, gathered, swap_in: list[tuple[int, int]], restores: list[int]) -> None:
        """Queue the step's host copies: swap-ins into the KV caches, then the gathered swap-outs to the host."""
        if gathered is None and not swap_in:
            return
        n = (len(gathered[1]) if gathered else 0) + len(swap_in)
        self.bytes_moved += n * self.block_bytes
        if not self.cuda:
            self._copy(gathered, swap_in)
            self._landed.extend(restores)
            return
        self._prune()
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)         # the gather and every earlier read of reused blocks come first
        with torch.cuda.stream(self.stream):
            keep = self._copy(gathered, swap_in)
            done = torch.cuda.Event()
            done.record(self.stream)
        self._inflight.append((done, list(restores), keep))

    def _copy(self, gathered, swap_in: list[tuple[int, int]]) -> list:
        keep = []
        nb = self.cuda
        if swap_in:
            pairs = sorted(swap_in)
            host_ids = [h for h, _ in pairs]
            staged = torch.empty((len(pairs),) + tuple(self.host.shape[1:]), dtype=self.host.dtype, device=self.device)
            for i, h, length in _runs(host_ids):
                staged[i:i + length].copy_(self.host[h:h + length], non_blocking=nb)
            dev = upload_nonblocking([d for _, d in pairs], torch.int64, self.device)
            if self.storage is not None:   # one scatter over every layer
                self.storage.index_copy_(1, dev, staged.transpose(0, 1))
            else:
                for j, c in enumerate(self.layers):
                    c.index_copy_(0, dev, staged[:, j])
            keep += [staged, dev]
        if gathered is not None:
            staged, host_ids = gathered
            if nb:
                staged.record_stream(self.stream)   # allocated on the main stream, read here
            for i, h, length in _runs(host_ids):
                self.host[h:h + length].copy_(staged[i:i + length], non_blocking=nb)
            keep.append(staged)
        return keep

    # ------------------------------------------------------------------ completion
    def _prune(self) -> None:
        """Retire completed copies (in order): their buffers go, their restores are reported by ``poll``."""
        while self._inflight and self._inflight[0][0].query():
            self._landed += self._inflight.popleft()[1]

    def poll(self) -> list[int]:
        """Seq ids whose restores have landed since the last call (never blocks)."""
        self._prune()
        landed, self._landed = self._landed, []
        return landed

    def wait(self) -> list[int]:
        """Block until the oldest copies in flight complete (nothing else can run); -> their restores."""
        if self._inflight:
            self._inflight[0][0].synchronize()
        return self.poll()

    @property
    def copies_in_flight(self) -> int:
        return len(self._inflight)

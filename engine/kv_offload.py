"""Host copies of KV blocks: offloaded idle sessions and swapped-out sequences (the scheduler decides, this
moves bytes), off the engine thread's critical path.

    host: [num_host_blocks, 2 * num_layers, block_size, num_kv_heads, head_dim]   pinned on CUDA

Block-major, so one host block of every layer's K and V is contiguous and a run of consecutive host
blocks moves in one copy. Per step (``SchedulerOutput``), in the order the scheduler's copy contract asks
(reads before writes, ``scheduler.kv_offload``):

    main stream:  gather the swap-out device blocks into a staging buffer   (2 kernels over all layers)
                  (the step's block copies and forward follow on this stream)
    in stream:    after the main stream up to here: host runs -> device staging (async, pinned) -> one
                  scatter into the KV caches; an event: the step's restores have landed once it completes
    out stream:   after the main stream up to here: staging -> host runs (async, pinned)

One stream a direction, so restores and offloads overlap each other as well as the forward. Host blocks
order the two: a restore waits for an offload still writing a host block it reads, an offload for a
restore still reading a host block it overwrites (host blocks freed by a restore are reused at once).

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
        # one stream a direction: host -> device and device -> host copies overlap (PCIe is full duplex)
        self.in_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.out_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ins: deque[tuple] = deque()    # (done event, restores, host ids read, keep-alive), in stream order
        self._outs: deque[tuple] = deque()   # (done event, host ids written, keep-alive), in stream order
        self._host_reads: dict[int, object] = {}    # host block -> event of the in-flight restore reading it
        self._host_writes: dict[int, object] = {}   # host block -> event of the in-flight offload writing it
        self._landed: list[int] = []
        self.bytes_moved = 0

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
        if self.storage is not None:
            # one gather over every layer (contiguous 32 KB-ish rows), then block-major: measured faster on an
            # H200 than one index_select over a transposed view (a generic strided kernel on the main stream)
            staged = self.storage.index_select(1, dev).transpose(0, 1).contiguous()   # [n, 2L, bs, Hkv, D]
        else:
            staged = torch.stack([c.index_select(0, dev) for c in self.layers], dim=1)
        return staged, [h for _, h in pairs]

    def copy(self, gathered, swap_in: list[tuple[int, int]], restores: list[int]) -> None:
        """Queue the step's host copies: swap-ins into the KV caches, the gathered swap-outs to the host."""
        if gathered is None and not swap_in:
            return
        n = (len(gathered[1]) if gathered else 0) + len(swap_in)
        self.bytes_moved += n * self.block_bytes
        if not self.cuda:
            if swap_in:
                self._restore(swap_in)
            if gathered is not None:
                self._offload(*gathered)
            self._landed.extend(restores)
            return
        self._prune()
        main = torch.cuda.current_stream(self.device)
        if swap_in:
            host_ids = sorted(h for h, _ in swap_in)
            s = self.in_stream
            s.wait_stream(main)            # every earlier read of the device blocks it overwrites (gathers) first
            self._wait_for(s, self._host_writes, host_ids)    # an offload still writing a host block it reads
            with torch.cuda.stream(s):
                keep = self._restore(swap_in)
                done = torch.cuda.Event()
                done.record(s)
            self._ins.append((done, list(restores), host_ids, keep))
            for h in host_ids:
                self._host_reads[h] = done
        if gathered is not None:
            staged, host_ids = gathered
            s = self.out_stream
            s.wait_stream(main)            # the gather
            self._wait_for(s, self._host_reads, host_ids)     # a restore still reading a host block it overwrites
            staged.record_stream(s)        # allocated on the main stream, read here
            with torch.cuda.stream(s):
                self._offload(staged, host_ids)
                done = torch.cuda.Event()
                done.record(s)
            self._outs.append((done, host_ids, staged))
            for h in host_ids:
                self._host_writes[h] = done

    @staticmethod
    def _wait_for(stream, pending: dict, host_ids: list[int]) -> None:
        events = {id(e): e for e in (pending.get(h) for h in host_ids) if e is not None}
        for e in events.values():
            stream.wait_event(e)

    def _restore(self, swap_in: list[tuple[int, int]]) -> list:
        pairs = sorted(swap_in)
        nb = self.cuda
        staged = torch.empty((len(pairs),) + tuple(self.host.shape[1:]), dtype=self.host.dtype, device=self.device)
        for i, h, length in _runs([h for h, _ in pairs]):
            staged[i:i + length].copy_(self.host[h:h + length], non_blocking=nb)
        dev = upload_nonblocking([d for _, d in pairs], torch.int64, self.device)
        if self.storage is not None:
            self.storage.index_copy_(1, dev, staged.transpose(0, 1))      # one scatter over every layer
        else:
            for j, c in enumerate(self.layers):
                c.index_copy_(0, dev, staged[:, j])
        return [staged, dev]

    def _offload(self, staged: torch.Tensor, host_ids: list[int]) -> None:
        for i, h, length in _runs(host_ids):
            self.host[h:h + length].copy_(staged[i:i + length], non_blocking=self.cuda)

    # ------------------------------------------------------------------ completion
    def _prune(self) -> None:
        """Retire completed copies (in stream order): their buffers go, their restores are reported by ``poll``."""
        while self._ins and self._ins[0][0].query():
            done, restores, host_ids, _ = self._ins.popleft()
            self._landed += restores
            self._forget(self._host_reads, host_ids, done)
        while self._outs and self._outs[0][0].query():
            done, host_ids, _ = self._outs.popleft()
            self._forget(self._host_writes, host_ids, done)

    @staticmethod
    def _forget(pending: dict, host_ids: list[int], done) -> None:
        for h in host_ids:
            if pending.get(h) is done:
                del pending[h]

    def poll(self) -> list[int]:
        """Seq ids whose restores have landed since the last call (never blocks)."""
        if self.cuda:
            self._prune()
        landed, self._landed = self._landed, []
        return landed

    def wait(self) -> list[int]:
        """Block until the oldest restore in flight lands (nothing else can run); -> the restores landed."""
        if self._ins:
            self._ins[0][0].synchronize()
        return self.poll()

    @property
    def copies_in_flight(self) -> int:
        return len(self._ins) + len(self._outs)

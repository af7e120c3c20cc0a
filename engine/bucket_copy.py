"""Bulk application of bucketed weight updates: a validated bucket layout resolved once to parameter slices,
then every update is a few multi-tensor copies per bucket instead of a Python round per tensor.

A bucketed loader (CUDA IPC, NCCL/gloo broadcast) delivers flat uint8 buffers plus a layout that says where
each named tensor lies in them. The layout is the same every update of a training run, so everything derived
from it (validation against the model, destination slices, and, for loaders that reuse their buffers, the
source views) is computed on the first update and reused::

    layout (key, bucket_sizes, entries)  --validate once-->  BucketCopyPlan
        per bucket b: dst[i] = param slice of entry i     src[i] = buf_b[offset_i : offset_i + nbytes_i] as dtype/shape
    per update, per bucket:  copy_many(dst, src)   (memcpy per large tensor, one multi-tensor copy for the rest)

The optional loader protocol (duck-typed; ``weight_sync`` implements it, the engine never imports it)::

    loader.bucket_plan()       -> layout: .key (hashable), .bucket_sizes, .entries (name, shape, dtype, bucket, offset)
    loader.iter_buckets()      -> (bucket index, uint8 buffer [>= size]) for every bucket, each once
    loader.buckets_resident    -> True when every bucket is readable before the first is yielded (nothing can stop
                                  half-way, so no rollback copy is needed)
    loader.persistent_buffers  -> True when the same buffers come back on every update with this layout (the source
                                  views are cached; a loader with fresh buffers each time must leave it False)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from engine.weights import WeightMapper


@dataclass
class _BucketCopies:
    names: list[str]                        # HF names written from this bucket, in layout order
    dst: list[torch.Tensor]                 # parameter slices (views; parameters are never reallocated)
    layout: list[tuple[int, int, torch.dtype, tuple[int, ...]]]  # (offset, nbytes, dtype, shape) per dst
    size: int                               # bytes the bucket must hold
    cached_src: Optional[tuple[int, int, list[torch.Tensor]]] = None  # (data_ptr, numel, views) of a reused buffer


@dataclass
class _ChunkCopies:
    """One update's copies as a single launch of ``engine.kernels.bulk_copy`` (built for these source buffers)."""
    sources: tuple[tuple[int, int, int], ...]   # (bucket, data_ptr, numel) of each buffer the table reads
    table: Any                                  # engine.kernels.bulk_copy.ChunkTable: the chunks
    rest: list[tuple[int, int]]                 # (bucket, entry) the kernel cannot copy (dtype cast, alignment)
    large: list[tuple[int, int]]                # (bucket, entry) copied by one memcpy each (>= kernel_max_bytes)
    kernel_max_bytes: Optional[int]             # the split this table was built for


@dataclass
class BucketCopyPlan:
    key: Any
    buckets: list[_BucketCopies]
    names: tuple[str, ...]                  # every HF name written, layout order
    num_bytes: int                          # bytes of those tensors as delivered
    chunks: Optional[_ChunkCopies] = None   # the last resident update's one-launch copy (copy_resident)

    def sources(self, bucket: int, buf: torch.Tensor, reuse: bool) -> list[torch.Tensor]:
        """Views of ``buf`` (one bucket) as the tensors it carries; cached when the loader reuses its buffers."""
        bc = self.buckets[bucket]
        ptr = buf.data_ptr()
        if reuse and bc.cached_src is not None and bc.cached_src[:2] == (ptr, buf.numel()):
            return bc.cached_src[2]
        views = [buf[off:off + n].view(dtype).view(shape) for off, n, dtype, shape in bc.layout]
        bc.cached_src = (ptr, buf.numel(), views) if reuse else None
        return views


def check_buffer(plan: BucketCopyPlan, bucket: Any, buf: Any, seen: set[int]) -> int:
    """Validate one yielded (bucket, buffer) pair; -> the bucket index. Raises ValueError naming the problem."""
    if isinstance(bucket, bool) or not isinstance(bucket, int) or not 0 <= bucket < len(plan.buckets):
        raise ValueError(f"loader yielded bucket index {bucket!r}; the layout has {len(plan.buckets)} buckets")
    if bucket in seen:
        raise ValueError(f"loader yielded bucket {bucket} twice")
    if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(f"bucket {bucket} must be a contiguous 1-D uint8 tensor, got "
                         f"{type(buf).__name__ if not isinstance(buf, torch.Tensor) else (buf.dtype, tuple(buf.shape))}")
    if buf.numel() < plan.buckets[bucket].size:
        raise ValueError(f"bucket {bucket} holds {buf.numel()} bytes; the layout needs {plan.buckets[bucket].size}")
    return bucket


def build_plan(layout: Any, mapper: WeightMapper, params: dict[str, nn.Parameter],
               check_manifest) -> BucketCopyPlan:
    """Validate ``layout`` against the model (``check_manifest``: the updater's whole-manifest check, raising
    WeightUpdateError) and resolve every entry to its destination slice."""
    sizes = tuple(int(s) for s in layout.bucket_sizes)
    manifest: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for e in layout.entries:
        if e.name in manifest:
            raise ValueError(f"weight {e.name!r} appears twice in the bucket layout")
        manifest[e.name] = (tuple(e.shape), e.dtype)
    check_manifest(manifest)
    buckets = [_BucketCopies([], [], [], size) for size in sizes]
    names: list[str] = []
    num_bytes = 0
    for e in layout.entries:
        target = mapper.resolve(e.name)
        if target is None:
            continue  # deliberately ignored (tied lm_head, rotary inv_freq)
        nbytes = math.prod(e.shape) * e.dtype.itemsize
        if not 0 <= e.bucket < len(sizes) or e.offset < 0 or e.offset + nbytes > sizes[e.bucket]:
            raise ValueError(f"weight {e.name!r} lies outside bucket {e.bucket} of the layout")
        if e.offset % e.dtype.itemsize:
            raise ValueError(f"weight {e.name!r} is at offset {e.offset}, not a multiple of its {e.dtype} size")
        dst = params[target.param_name].data
        if target.shard is not None:
            dst = dst[target.shard]
        bc = buckets[e.bucket]
        bc.names.append(e.name)
        bc.dst.append(dst)
        bc.layout.append((e.offset, nbytes, e.dtype, tuple(e.shape)))
        names.append(e.name)
        num_bytes += nbytes
    return BucketCopyPlan(layout.key, buckets, tuple(names), num_bytes)


LARGE_COPY_BYTES = 1 << 20
# copy_resident: a tensor of at least this many bytes gets its own memcpy rather than a share of the one-launch
# kernel (None: the kernel takes every tensor it can). Why a split: on an H200 the kernel moved the 0.5B update
# (~290 tensors, most under 10 MB) in 0.64 ms against 1.00 ms per tensor (launches dominate), but the 8B update
# (~290 tensors, most 30-120 MB) in 8.76 ms against 8.53 (a memcpy streams a large tensor slightly faster than
# the kernel's programs do). Same run, 2026-12-04 (benchmarks/bucket_apply_gpu.py, raw memcpy 7.58 / 0.48 ms):
# split at 64 MiB 8.44 / 0.56 ms, at 16 MiB 8.56 / 0.56, at 4 MiB 8.68 / 0.76, no split 9.13 / 0.59, per tensor
# 8.49 / 1.11 (8B / 0.5B).
KERNEL_MAX_BYTES: Optional[int] = 64 << 20


def copy_many(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for every i. A same-dtype copy of a large tensor is one copy_ each (a device
    memcpy, at the card's copy bandwidth); the many small ones (norms, biases) and dtype conversions share one
    multi-tensor copy (``_foreach_copy_`` runs an elementwise kernel on everything it is given). With
    ``_foreach_copy_`` alone, an 8B update through CUDA IPC took 2.4x the memcpy time of its bytes on an H200;
    this split has not been timed there yet (benchmarks/colocated_gpu.py)."""
    small_dst, small_src = [], []
    for d, s in zip(dst, src, strict=True):
        if d.dtype == s.dtype and d.numel() * d.element_size() >= LARGE_COPY_BYTES and d.is_contiguous() \
                and s.is_contiguous():
            d.copy_(s)
        else:
            small_dst.append(d)
            small_src.append(s)
    if small_dst:
        torch._foreach_copy_(small_dst, small_src)


def copy_resident(plan: BucketCopyPlan, ready: list[tuple[int, torch.Tensor, list[torch.Tensor]]],
                  kernel_device: Optional[torch.device], kernel_max_bytes: Any = "default") -> None:
    """Every bucket of a resident update, ``ready`` = (bucket, buffer, its source views), into the parameters.
    ``kernel_device`` (the parameters' device, where the kernel runs): one launch of ``engine.kernels.bulk_copy``
    for every same-dtype, 16-byte-aligned tensor under ``kernel_max_bytes`` (default ``KERNEL_MAX_BYTES``; None:
    no limit), one memcpy each for the same-dtype tensors at or over it, ``copy_many`` for the rest. The split is
    kept while the buffers stay where they are (a loader that reuses its buffers pays for it once). None:
    ``copy_many`` per bucket."""
    if kernel_device is None:
        for b, _, src in ready:
            copy_many(plan.buckets[b].dst, src)
        return
    from engine.kernels.bulk_copy import copy_chunks

    max_bytes = KERNEL_MAX_BYTES if kernel_max_bytes == "default" else kernel_max_bytes
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ValueError(f"copy_resident: kernel_max_bytes must be a positive int or None, got {max_bytes!r}")
    sources = tuple((b, buf.data_ptr(), buf.numel()) for b, buf, _ in ready)
    if plan.chunks is None or plan.chunks.sources != sources or plan.chunks.kernel_max_bytes != max_bytes:
        plan.chunks = _split_copies(plan, ready, sources, max_bytes)
    chunks = plan.chunks
    views = {b: src for b, _, src in ready}
    for b, i in chunks.large:
        plan.buckets[b].dst[i].copy_(views[b][i])
    if chunks.table is not None:
        copy_chunks(chunks.table)
    if chunks.rest:
        copy_many([plan.buckets[b].dst[i] for b, i in chunks.rest], [views[b][i] for b, i in chunks.rest])


def _split_copies(plan: BucketCopyPlan, ready, sources, max_bytes: Optional[int]) -> _ChunkCopies:
    """Each tensor of ``ready`` to one of: its own memcpy (same dtype and device, contiguous, ``max_bytes`` or
    more), the kernel's chunk table (same dtype and device, contiguous, 16-byte aligned, smaller), the rest."""
    from engine.kernels.bulk_copy import ALIGN, plan_chunks

    ranges, rest, large, bases = [], [], [], []
    for b, _, src in ready:
        for i, (d, s) in enumerate(zip(plan.buckets[b].dst, src, strict=True)):
            nbytes = d.numel() * d.element_size()
            if nbytes == 0:
                continue
            plain = d.dtype == s.dtype and d.device == s.device and d.is_contiguous() and s.is_contiguous()
            if plain and max_bytes is not None and nbytes >= max_bytes:
                large.append((b, i))
            elif plain and (d.data_ptr() | s.data_ptr() | nbytes) % ALIGN == 0:
                ranges.append((s.data_ptr(), d.data_ptr(), nbytes))
                bases = bases or [s, d]
            else:
                rest.append((b, i))
    table = plan_chunks(ranges, *bases) if ranges else None
    return _ChunkCopies(sources, table, rest, large, max_bytes)


def all_finite(tensors: list[torch.Tensor]) -> list[bool]:
    """Per tensor: no NaN/inf (one host sync for the whole list)."""
    if not tensors:
        return []
    return torch.stack([torch.isfinite(t).all() for t in tensors]).tolist()

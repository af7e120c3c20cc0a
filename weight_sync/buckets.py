"""Flat buckets: many named tensors packed into few contiguous byte buffers, plus the manifest to unpack them.

Layout of one bucket (offsets aligned so every tensor's view is aligned for its dtype and for GPU loads)::

    bucket b: [ tensor a | pad | tensor b | pad | ... ]   uint8, <= bucket_bytes unless one tensor is larger
              ^offset 0         ^offset of b (multiple of ALIGN)

Manifest (layout) wire form: UTF-8 JSON, small (one entry per tensor). It holds no version (that travels beside
it), so a training run's updates all carry the same bytes and a receiver parses and validates them once::

    {"bucket_sizes": [int, ...],
     "tensors": [[name, [shape...], "float32", bucket, offset], ...]}   # in bucket order, then offset order
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional, Union

import torch

from weight_sync.base import Manifest

ALIGN = 256  # bytes; >= any dtype's size and the CUDA allocator's alignment

NamedTensors = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


@dataclass(frozen=True)
class BucketEntry:
    name: str                 # Hugging Face name
    shape: tuple[int, ...]
    dtype: torch.dtype
    bucket: int               # index into the bucket list
    offset: int               # byte offset inside the bucket, a multiple of ALIGN

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * self.dtype.itemsize


@dataclass(frozen=True)
class BucketPlan:
    version: Optional[int]
    bucket_sizes: tuple[int, ...]
    entries: tuple[BucketEntry, ...]

    def manifest(self) -> Manifest:
        return {e.name: (e.shape, e.dtype) for e in self.entries}

    def entries_of(self, bucket: int) -> tuple[BucketEntry, ...]:
        return self.by_bucket[bucket]

    @property
    def total_bytes(self) -> int:
        return sum(self.bucket_sizes)

    @functools.cached_property
    def key(self) -> bytes:
        """A digest of the layout's wire form: equal keys = equal layouts (engines cache what they derive)."""
        return hashlib.blake2b(self.to_bytes(), digest_size=16).digest()

    @functools.cached_property
    def by_bucket(self) -> tuple[tuple[BucketEntry, ...], ...]:
        out: list[list[BucketEntry]] = [[] for _ in self.bucket_sizes]
        for e in self.entries:
            out[e.bucket].append(e)
        return tuple(tuple(b) for b in out)

    def to_bytes(self) -> bytes:
        body = {"bucket_sizes": list(self.bucket_sizes),
                "tensors": [[e.name, list(e.shape), _dtype_name(e.dtype), e.bucket, e.offset] for e in self.entries]}
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "BucketPlan":
        """Parse a layout (version None). Cached: a trainer sends the same bytes every update, so the plan object,
        its ``key`` and everything an engine derives from it are computed once."""
        return _parse_plan(bytes(data))


@functools.lru_cache(maxsize=8)
def _parse_plan(data: bytes) -> BucketPlan:
    try:
        body = json.loads(data.decode())
        entries = tuple(BucketEntry(name, tuple(shape), _dtype_of(dt), bucket, offset)
                        for name, shape, dt, bucket, offset in body["tensors"])
        plan = BucketPlan(None, tuple(body["bucket_sizes"]), entries)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"malformed bucket manifest: {e}") from None
    for e in plan.entries:
        if not 0 <= e.bucket < len(plan.bucket_sizes) or e.offset < 0 or \
                e.offset + e.nbytes > plan.bucket_sizes[e.bucket]:
            raise ValueError(f"malformed bucket manifest: {e.name!r} lies outside its bucket")
    return plan


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"manifest names unknown dtype {name!r}")
    return dtype


def named_tensor_list(named_tensors: NamedTensors) -> list[tuple[str, torch.Tensor]]:
    """A state dict, ``named_parameters()`` or any iterable of pairs -> a list of (name, detached tensor).
    Repeated names are an error (a sender must not send a tensor twice)."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    out: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name!r}: expected a tensor, got {type(tensor).__name__}")
        if name in seen:
            raise ValueError(f"tensor {name!r} given twice")
        seen.add(name)
        out.append((name, tensor.detach()))
    return out


def plan_buckets(tensors: list[tuple[str, torch.Tensor]], bucket_bytes: int,
                 version: Optional[int] = None, cast: Optional[torch.dtype] = None) -> BucketPlan:
    """Greedy packing in the given order; a tensor larger than ``bucket_bytes`` gets a bucket of its own.
    ``cast``: floating-point tensors are sent in this dtype (e.g. an fp32 trainer's weights to a bf16 engine:
    half the bytes; ``pack_bucket`` converts while it copies)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    if cast is not None and not (isinstance(cast, torch.dtype) and cast.is_floating_point):
        raise ValueError(f"cast must be a floating-point torch.dtype or None, got {cast!r}")
    entries: list[BucketEntry] = []
    sizes: list[int] = []
    used = 0  # bytes used in the open bucket (last of `sizes`), aligned
    for name, t in tensors:
        dtype = cast if cast is not None and t.dtype.is_floating_point else t.dtype
        nbytes = t.numel() * dtype.itemsize
        if not sizes or (used > 0 and used + nbytes > bucket_bytes):
            sizes.append(0)
            used = 0
        entries.append(BucketEntry(name, tuple(t.shape), dtype, len(sizes) - 1, used))
        sizes[-1] = used + nbytes
        used = _align(used + nbytes)
    return BucketPlan(version, tuple(sizes), tuple(entries))


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pack_bucket(plan: BucketPlan, bucket: int, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
    """Copy bucket ``bucket``'s tensors into ``out`` (uint8 [>= bucket size], any device): one multi-tensor copy
    (``torch._foreach_copy_``: a few kernel launches per bucket instead of one per tensor). A tensor planned in
    another dtype (``plan_buckets(cast=...)``) is converted by the copy into its typed view of ``out``."""
    dst, src, cast_dst, cast_src = [], [], [], []
    for e in plan.entries_of(bucket):
        t = tensors[e.name]
        if t.device != out.device:
            t = t.to(out.device)  # NOTE: blocking; a non-blocking device->host copy could be read unfinished
        if t.dtype == e.dtype:
            dst.append(out[e.offset:e.offset + e.nbytes])
            src.append(t.contiguous().reshape(-1).view(torch.uint8))
        else:
            cast_dst.append(out[e.offset:e.offset + e.nbytes].view(e.dtype))
            cast_src.append(t.reshape(-1))
    if dst:
        _copy_bytes(dst, src)
    if cast_dst:
        torch._foreach_copy_(cast_dst, cast_src)


_MEMCPY_BYTES = 1 << 20


def _copy_bytes(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Byte copies into a bucket: a memcpy (``copy_``) per tensor of 1 MB or more, one multi-tensor copy
    (``_foreach_copy_``, an elementwise kernel) for the small ones. (The engine applies buckets the same way,
    engine/bucket_copy.py, which says what was measured; weight_sync imports nothing of ours, so the rule is
    stated in both.)"""
    small_dst, small_src = [], []
    for d, s in zip(dst, src):
        if d.numel() >= _MEMCPY_BYTES:
            d.copy_(s)
        else:
            small_dst.append(d)
            small_src.append(s)
    if small_dst:
        torch._foreach_copy_(small_dst, small_src)


def unpack_bucket(plan: BucketPlan, bucket: int, buf: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Views of ``buf`` (uint8, one bucket) as the named tensors it holds; no copy."""
    for e in plan.entries_of(bucket):
        yield e.name, buf[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)


class BucketedLoader:
    """Base of the loaders that deliver flat buckets (CUDA IPC, broadcast, Ray objects): from ``bucket_plan()``
    and ``iter_buckets()`` it derives the per-tensor side of the loader protocol (``names_and_shapes``,
    ``iter_tensors``: views of each bucket as it arrives). The engine's bulk path uses the buckets directly."""

    def bucket_plan(self) -> BucketPlan:
        raise NotImplementedError

    def iter_buckets(self) -> Iterator[tuple[int, torch.Tensor]]:
        raise NotImplementedError

    def names_and_shapes(self) -> Manifest:
        return self.bucket_plan().manifest()

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        plan = self.bucket_plan()
        for b, buf in self.iter_buckets():
            yield from unpack_bucket(plan, b, buf)

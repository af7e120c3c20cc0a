"""Many byte ranges copied by one kernel launch: a weight update's buckets into the parameters.

An update of an 8B model through CUDA IPC is ~230 tensors in ~64 buckets. One ``copy_`` (a device memcpy) per
tensor ran at 9.0 ms on an H200 against 7.5 ms for one memcpy of the same 16 GB (benchmarks/colocated_gpu.py,
2026-12-02): every copy is its own launch, and each pays a ramp-up and a tail in which the card's SMs idle. Here
the ranges are cut into chunks of at most ``CHUNK_BYTES`` and one program copies one chunk, so the whole update
is one launch whatever the number of tensors::

    table [C, 3] int64, one row per chunk: (source offset, destination offset, length), in 8-byte words from
                                           two base pointers (any tensors on the device)
    program c:  for w in 0 .. CHUNK_WORDS step BLOCK:  dst[c][w : w + BLOCK] = src[c][w : w + BLOCK]  (masked
                                                        only in a range's last chunk)

The offsets stand for raw device addresses (the table is built from ``data_ptr()`` of live tensors: whoever
builds it keeps those tensors alive, and unchanged in place, for as long as the table is used). Every range must
start and end on a 16-byte boundary (``ALIGN``): ``plan_chunks`` refuses any other, and callers copy those some
other way. Offsets from base pointers whose alignment Triton knows (plus ``tl.multiple_of`` hints) make every
access a 16-byte vector (checked in the sm_90 PTX by tests/engine/test_bulk_copy.py); a first version cast
table addresses to pointers, compiled to 8-byte accesses, and ran the 8B update at 1.15x a memcpy, no faster
than the per-tensor copies (H200, 2026-12-03).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ALIGN = 16                      # bytes: start and length of every range (two 8-byte words: vector loads)
CHUNK_BYTES = 1 << 19           # one program's share: 512 KiB (a 16 GB update is ~32k programs)
BLOCK_WORDS = 1024              # 8 KiB per iteration of a program (4 warps: 64 bytes per thread)
NUM_WARPS = 4
_CHUNK_WORDS = CHUNK_BYTES // 8


@triton.jit
def _copy_chunks_kernel(table_ptr, src_base, dst_base, CHUNK_WORDS: tl.constexpr, BLOCK: tl.constexpr):
    # Offsets are in 8-byte words from the two base pointers (any sign: int64 arithmetic), each a multiple of 2
    # (16 bytes, plan_chunks checks): with the bases' own 16-byte alignment that lets loads and stores be 16-byte
    # vectors. A full chunk (all but each range's last) runs unmasked.
    row = table_ptr + tl.program_id(0).to(tl.int64) * 3
    src = src_base + tl.multiple_of(tl.load(row), 2)
    dst = dst_base + tl.multiple_of(tl.load(row + 1), 2)
    n = tl.multiple_of(tl.load(row + 2), 2)                 # words in this chunk, 2 .. CHUNK_WORDS
    idx = tl.arange(0, BLOCK)
    if n == CHUNK_WORDS:
        for start in range(0, CHUNK_WORDS, BLOCK):
            tl.store(dst + start + idx, tl.load(src + start + idx, eviction_policy="evict_first"))
    else:
        for start in range(0, CHUNK_WORDS, BLOCK):
            m = start + idx < n
            tl.store(dst + start + idx, tl.load(src + start + idx, mask=m, eviction_policy="evict_first"), mask=m)


@dataclass(frozen=True)
class ChunkTable:
    """The chunks of a set of ranges as the kernel reads them: word offsets from two base tensors."""
    table: torch.Tensor         # [C, 3] int64 on the device: (source offset, destination offset, words)
    src_base: torch.Tensor      # int64 views whose first word the offsets count from (kept alive with the table)
    dst_base: torch.Tensor

    @property
    def num_chunks(self) -> int:
        return int(self.table.shape[0])


def plan_chunks(ranges: list[tuple[int, int, int]], src_base: torch.Tensor, dst_base: torch.Tensor) -> ChunkTable:
    """(source address, destination address, bytes) per range -> the kernel's chunk table, as word offsets from
    ``src_base`` and ``dst_base`` (any tensors on the kernel's device, 16-byte aligned: e.g. one source buffer and
    one parameter; the offsets may be negative). ValueError for a range that is empty or not on 16-byte
    boundaries, or a base that is not 16-byte aligned."""
    for name, base in (("src_base", src_base), ("dst_base", dst_base)):
        if base.data_ptr() % ALIGN:
            raise ValueError(f"plan_chunks: {name} at 0x{base.data_ptr():x} is not {ALIGN}-byte aligned")
    s0, d0 = src_base.data_ptr(), dst_base.data_ptr()
    rows: list[tuple[int, int, int]] = []
    for i, (src, dst, nbytes) in enumerate(ranges):
        if nbytes <= 0 or src <= 0 or dst <= 0 or (src | dst | nbytes) % ALIGN:
            raise ValueError(f"range {i}: (src 0x{src:x}, dst 0x{dst:x}, {nbytes} bytes) must be non-empty and "
                             f"on {ALIGN}-byte boundaries")
        for off in range(0, nbytes, CHUNK_BYTES):
            rows.append(((src + off - s0) // 8, (dst + off - d0) // 8, min(CHUNK_BYTES, nbytes - off) // 8))
    device = dst_base.device
    return ChunkTable(torch.tensor(rows, dtype=torch.int64).reshape(-1, 3).to(device),
                      _words(src_base), _words(dst_base))


def _words(t: torch.Tensor) -> torch.Tensor:
    """A one-word int64 tensor at ``t``'s first byte (what the kernel's base pointer is)."""
    return torch.empty(0, dtype=torch.int64, device=t.device).set_(t.untyped_storage(), t.storage_offset()
                                                                   * t.element_size() // 8, (1,))


def copy_chunks(chunks: ChunkTable, block_words: int | None = None, num_warps: int | None = None) -> None:
    """Run ``plan_chunks``' table on the current stream (asynchronous, as a ``copy_``). ``block_words`` (words per
    iteration, a power of two dividing the chunk) and ``num_warps`` default to the module's ``BLOCK_WORDS`` and
    ``NUM_WARPS`` (benchmarks/bucket_apply_gpu.py times other values)."""
    block_words = BLOCK_WORDS if block_words is None else block_words
    num_warps = NUM_WARPS if num_warps is None else num_warps
    if block_words <= 0 or block_words & (block_words - 1) or _CHUNK_WORDS % block_words:
        raise ValueError(f"copy_chunks: block_words={block_words} must be a power of two dividing {_CHUNK_WORDS}")
    table = chunks.table
    if table.dtype != torch.int64 or table.dim() != 2 or table.shape[1] != 3 or not table.is_contiguous():
        raise ValueError(f"copy_chunks: the table must be a contiguous [C, 3] int64 tensor, got "
                         f"{table.dtype} {tuple(table.shape)}")
    if table.shape[0]:
        _copy_chunks_kernel[(table.shape[0],)](table, chunks.src_base, chunks.dst_base, CHUNK_WORDS=_CHUNK_WORDS,
                                               BLOCK=block_words, num_warps=num_warps)

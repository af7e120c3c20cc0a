"""Many byte ranges copied by one kernel launch: a weight update's buckets into the parameters.

An update of an 8B model through CUDA IPC is ~230 tensors in ~64 buckets. One ``copy_`` (a device memcpy) per
tensor ran at 9.0 ms on an H200 against 7.5 ms for one memcpy of the same 16 GB (benchmarks/colocated_gpu.py,
2026-12-02): every copy is its own launch, and each pays a ramp-up and a tail in which the card's SMs idle. Here
the ranges are cut into chunks of at most ``CHUNK_BYTES`` and one program copies one chunk, so the whole update
is one launch whatever the number of tensors::

    table [C, 3] int64, one row per chunk: (source address, destination address, length in 8-byte words)
    program c:  for w in 0 .. CHUNK_WORDS step BLOCK:  dst[c][w : w + BLOCK] = src[c][w : w + BLOCK]  (masked)

The addresses are raw device pointers (the table is built from ``data_ptr()`` of live tensors: whoever builds it
keeps those tensors alive, and unchanged in place, for as long as the table is used). Every range must start and
end on a 16-byte boundary (``ALIGN``): ``plan_chunks`` refuses any other, and callers copy those some other way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ALIGN = 16                      # bytes: start and length of every range (two 8-byte words: vector loads)
CHUNK_BYTES = 1 << 19           # one program's share: 512 KiB (a 16 GB update is ~32k programs)
_BLOCK_WORDS = 1024             # 8 KiB per iteration of a program (4 warps: 64 bytes per thread)
_CHUNK_WORDS = CHUNK_BYTES // 8


@triton.jit
def _copy_chunks_kernel(table_ptr, CHUNK_WORDS: tl.constexpr, BLOCK: tl.constexpr):
    row = table_ptr + tl.program_id(0).to(tl.int64) * 3
    src = tl.load(row).to(tl.pointer_type(tl.int64))
    dst = tl.load(row + 1).to(tl.pointer_type(tl.int64))
    n = tl.load(row + 2)                                   # words in this chunk, 1 .. CHUNK_WORDS
    for start in range(0, CHUNK_WORDS, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        m = idx < n
        tl.store(dst + idx, tl.load(src + idx, mask=m, eviction_policy="evict_first"), mask=m)


def plan_chunks(ranges: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
    """(source address, destination address, bytes) per range -> the kernel's chunk table [C, 3] int64 on
    ``device``. ValueError for a range that is empty, negative or not on 16-byte boundaries."""
    rows: list[tuple[int, int, int]] = []
    for i, (src, dst, nbytes) in enumerate(ranges):
        if nbytes <= 0 or src <= 0 or dst <= 0 or (src | dst | nbytes) % ALIGN:
            raise ValueError(f"range {i}: (src 0x{src:x}, dst 0x{dst:x}, {nbytes} bytes) must be non-empty and "
                             f"on {ALIGN}-byte boundaries")
        for off in range(0, nbytes, CHUNK_BYTES):
            rows.append((src + off, dst + off, min(CHUNK_BYTES, nbytes - off) // 8))
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3).to(device)


def copy_chunks(table: torch.Tensor) -> None:
    """Run ``plan_chunks``' table on the current stream (asynchronous, as a ``copy_``)."""
    if table.dtype != torch.int64 or table.dim() != 2 or table.shape[1] != 3 or not table.is_contiguous():
        raise ValueError(f"copy_chunks: the table must be a contiguous [C, 3] int64 tensor, got "
                         f"{table.dtype} {tuple(table.shape)}")
    if table.shape[0]:
        _copy_chunks_kernel[(table.shape[0],)](table, CHUNK_WORDS=_CHUNK_WORDS, BLOCK=_BLOCK_WORDS, num_warps=4)

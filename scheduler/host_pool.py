"""Host (pinned CPU) block ids for offloaded KV. Pure accounting, like BlockPool.

A block freed by a restore may be handed to an offload at once: the engine reads every host block a
step's restores read before it writes any (``scheduler.kv_offload``'s copy contract), and orders copies
of later steps behind those of earlier ones.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class HostBlockPool:
    def __init__(self, num_blocks: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"host pool num_blocks must be an int >= 0, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._held = [False] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n host blocks, ascending (consecutive ids copy as one run where the free list allows)."""
        assert n <= len(self._free), f"host pool: {n} requested, {len(self._free)} free"
        ids = sorted(self._free.popleft() for _ in range(n))
        for b in ids:
            assert not self._held[b]
            self._held[b] = True
        return ids

    def release(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            assert self._held[b], f"host block {b} released twice"
            self._held[b] = False
            self._free.append(b)

    def check_integrity(self, held: set[int]) -> None:
        assert len(self._free) + len(held) == self.num_blocks, "host pool leak"
        for b in range(self.num_blocks):
            assert self._held[b] == (b in held), f"host block {b}: held flag disagrees"

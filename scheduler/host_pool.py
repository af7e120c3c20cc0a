"""Host (pinned CPU) block ids for offloaded idle-session KV. Pure accounting, like BlockPool.

Blocks freed by a restore are handed back only at the start of the next step
(``release_deferred`` then ``flush``): the restore's host->device copy runs in the step that freed
them, and a later offload must not overwrite them before that copy has read them.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class HostBlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"host pool num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._deferred: list[int] = []
        self._held = [False] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self._free), f"host pool: {n} requested, {len(self._free)} free"
        ids = [self._free.popleft() for _ in range(n)]
        for b in ids:
            assert not self._held[b]
            self._held[b] = True
        return ids

    def release(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            assert self._held[b], f"host block {b} released twice"
            self._held[b] = False
            self._free.append(b)

    def release_deferred(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            assert self._held[b], f"host block {b} released twice"
            self._held[b] = False
        self._deferred.extend(block_ids)

    def flush(self) -> None:
        self._free.extend(self._deferred)
        self._deferred.clear()

    def check_integrity(self, held: set[int]) -> None:
        assert len(self._free) + len(self._deferred) + len(held) == self.num_blocks, "host pool leak"
        for b in range(self.num_blocks):
            assert self._held[b] == (b in held), f"host block {b}: held flag disagrees"

"""What happens to an idle session's KV under memory pressure.

Parked sessions (AWAITING_INPUT, or with a turn queued but not yet admitted) keep their KV on
the device. When a waiting turn cannot be admitted,
the least recently used idle sessions' blocks are copied to the host pool and their device blocks
released; they come back (prefix-cache hits first, copies for the rest) when their next turn is
admitted. Only when the host pool has no room is KV dropped: first the LRU host-resident
sessions', then, if the host pool is simply too small, the victim's own. A dropped session
re-prefills on its next turn. Running turns are never touched.

This class owns the host pool and the copy lists; the scheduler owns the sessions and asks.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from scheduler.block_pool import BlockPool
from scheduler.host_pool import HostBlockPool
from scheduler.request import KVLocation, Sequence, SequenceStatus


class IdleKVManager:
    def __init__(self, pool: BlockPool, host: HostBlockPool, stats) -> None:
        self.pool = pool
        self.host = host
        self.stats = stats
        # Sessions not running (AWAITING_INPUT, or a turn queued), least recently active first,
        # wherever their KV is.
        self.parked: OrderedDict[int, Sequence] = OrderedDict()
        self.swap_out: list[tuple[int, int]] = []   # (device block, host block), this step
        self.swap_in: list[tuple[int, int]] = []    # (host block, device block), this step

    def begin_step(self) -> None:
        self.host.flush()
        self.swap_out = []
        self.swap_in = []

    # ---------------------------------------------------------------- parked set
    def park(self, seq: Sequence) -> None:
        """A session stops running (its turn ended): it becomes the most recently active."""
        assert seq.status is not SequenceStatus.RUNNING
        self.parked.pop(seq.seq_id, None)
        self.parked[seq.seq_id] = seq

    def unpark(self, seq: Sequence) -> None:
        self.parked.pop(seq.seq_id, None)

    # ---------------------------------------------------------------- moves
    def drop(self, seq: Sequence, count: bool = True) -> None:
        """Forget a session's KV wherever it is (it re-prefills later). ``count``: a drop forced by
        memory pressure (closing a session or the no-retention baseline are not)."""
        if seq.kv is KVLocation.DEVICE:
            self.pool.release(seq.block_ids[::-1])
        elif seq.kv is KVLocation.HOST:
            self.host.release(seq.host_block_ids)
        if count and seq.num_computed_tokens:
            self.stats.dropped_sessions += 1
            self.stats.dropped_tokens += seq.num_computed_tokens
        seq.block_ids, seq.host_block_ids, seq.block_keys = [], [], []
        seq.num_computed_tokens = 0
        seq.kv = KVLocation.NONE

    def offload(self, seq: Sequence) -> bool:
        """Copy an idle session's device blocks to the host and release them; False (and nothing
        changed) when the host pool cannot take them even after dropping LRU host-resident KV."""
        assert seq.kv is KVLocation.DEVICE and seq.status is not SequenceStatus.RUNNING
        n = len(seq.block_ids)
        if n > self.host.num_blocks:
            return False
        for other in list(self.parked.values()):
            if self.host.num_free >= n:
                break
            if other is not seq and other.kv is KVLocation.HOST:
                self.drop(other)
        if self.host.num_free < n:
            return False
        seq.host_block_ids = self.host.allocate(n)
        self.swap_out.extend(zip(seq.block_ids, seq.host_block_ids))
        self.pool.release(seq.block_ids[::-1])
        seq.block_ids = []
        seq.kv = KVLocation.HOST
        self.stats.offloaded_blocks += n
        self.stats.offloaded_sessions += 1
        return True

    def restore(self, seq: Sequence, hits: list[int]) -> None:
        """Bring an offloaded session back: ``hits`` (already taken) replace its first blocks, fresh
        blocks from its reservation receive host copies for the rest."""
        assert seq.kv is KVLocation.HOST
        seq.block_ids = list(hits)
        for host_block in seq.host_block_ids[len(hits):]:
            device_block = self.pool.allocate_reserved()
            seq.num_reserved_blocks -= 1
            seq.block_ids.append(device_block)
            self.swap_in.append((host_block, device_block))
        self.stats.restored_blocks += len(seq.host_block_ids) - len(hits)
        self.stats.restored_sessions += 1
        self.host.release_deferred(seq.host_block_ids)
        seq.host_block_ids = []
        seq.kv = KVLocation.DEVICE

    # ---------------------------------------------------------------- pressure
    def freeable(self, exclude: Sequence) -> int:
        """Device blocks that offloading/dropping every parked session but ``exclude`` would free."""
        holders: dict[int, int] = {}
        for seq in self.parked.values():
            if seq is not exclude and seq.kv is KVLocation.DEVICE:
                for b in seq.block_ids:
                    holders[b] = holders.get(b, 0) + 1
        return sum(1 for b, n in holders.items() if self.pool.ref_count(b) == n)

    def make_room(self, shortfall: int, exclude: Sequence) -> bool:
        """Free ``shortfall`` more available device blocks from parked sessions (LRU first). Does
        nothing and returns False when even all of them would not be enough."""
        if shortfall <= 0:
            return True
        if self.freeable(exclude) < shortfall:
            return False
        target = self.pool.num_available + shortfall
        victims: Iterable[Sequence] = [s for s in self.parked.values()
                                       if s is not exclude and s.kv is KVLocation.DEVICE]
        for seq in victims:
            if self.pool.num_available >= target:
                break
            if not self.offload(seq):
                self.drop(seq)
        return self.pool.num_available >= target

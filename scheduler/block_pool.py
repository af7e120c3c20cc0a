"""The single owner of device KV block accounting: ref counts, the free list and the prefix-cache map.
Holds no tensors; the engine moves block contents when told to.

Block states (every block id is in exactly one):
    free       ref 0, no cached contents           -> in ``_free``
    evictable  ref 0, holds a registered full block -> in ``_evictable`` (LRU order, oldest first)
    in use     ref > 0 (maybe also registered in the prefix cache)

A reference is *active* (a running or queued sequence's) or *idle* (a parked session's, between turns).
A block whose every reference is idle is *reclaimable*: offloading or dropping those parked sessions
would free it. The pool counts them incrementally (``num_reclaimable``) so admission can count what
idle sessions could give back without scanning them. Reservations are not kept here: the KV manager
holds the one ledger of them (``scheduler.kv_manager``).

The accounting identity checked by ``check_integrity``:

    free + evictable + in_use == total        and        0 <= idle refs <= refs, per block

Prefix-cache keys chain over full blocks: ``key_i = (hash(key_{i-1}), tokens of block i,
weight_version)``; the dict compares whole keys, so a collision of the parent's int hash alone
cannot alias two blocks with different tokens. Only full, computed blocks are registered; a
block's id never changes while a sequence holds it.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Optional

BlockKey = tuple  # (parent hash: int, block tokens: tuple[int, ...], weight_version: int)

NO_PARENT = 0


def block_keys(
    token_ids: Sequence[int], block_size: int, weight_version: int, start_block: int = 0,
    parent_keys: Sequence[BlockKey] = (), num_tokens: Optional[int] = None,
) -> list[BlockKey]:
    """Chained keys of the full blocks of ``token_ids[:num_tokens]`` (all of it by default) from
    ``start_block`` on. ``num_tokens`` spares callers a copy of a long prefix.

    ``parent_keys`` are the keys already computed for blocks [0, start_block) (only the last is read).
    """
    keys: list[BlockKey] = []
    parent = hash(parent_keys[start_block - 1]) if start_block > 0 else NO_PARENT
    num_full = (len(token_ids) if num_tokens is None else num_tokens) // block_size
    for i in range(start_block, num_full):
        key = (parent, tuple(token_ids[i * block_size:(i + 1) * block_size]), weight_version)
        keys.append(key)
        parent = hash(key)
    return keys


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._idle_counts = [0] * num_blocks    # references held by parked sessions
        self._num_reclaimable = 0               # blocks with ref > 0 and every reference idle
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._key_of_block: list[Optional[BlockKey]] = [None] * num_blocks
        self._block_of_key: dict[BlockKey, int] = {}
        self.num_evictions = 0  # cached blocks whose contents were given up to satisfy an allocation

    # ---------------------------------------------------------------- counts
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def num_unheld(self) -> int:
        """Blocks an allocation can hand out right now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - len(self._free) - len(self._evictable)

    @property
    def num_reclaimable(self) -> int:
        """Held blocks whose every holder is a parked session (offloading them would free the block)."""
        return self._num_reclaimable

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of_key)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def is_reclaimable(self, block_id: int) -> bool:
        return 0 < self._ref_counts[block_id] == self._idle_counts[block_id]

    def num_evictable_among(self, block_ids: Sequence[int]) -> int:
        """How many of these blocks would leave the evictable set if taken (their ref is 0)."""
        refs = self._ref_counts
        return sum(1 for b in block_ids if refs[b] == 0)

    def num_reclaimable_among(self, block_ids: Sequence[int]) -> int:
        """How many of these blocks are reclaimable now (taking one actively makes it not)."""
        return sum(1 for b in block_ids if self.is_reclaimable(b))

    # ---------------------------------------------------------------- prefix cache
    def match_prefix(self, keys: Sequence[BlockKey]) -> list[int]:
        """Block ids of the longest cached prefix of ``keys`` (no ref counts change)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for key in keys:
            block_id = self._block_of_key.get(key)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def register(self, block_id: int, key: BlockKey) -> None:
        """Record that in-use block ``block_id`` now holds the full, computed block ``key``.

        If another block already holds the same key, the cache keeps that one (this block stays
        uncached and goes back to the free list when released)."""
        assert self._ref_counts[block_id] > 0, f"register of unheld block {block_id}"
        if not self.enable_prefix_caching or self._key_of_block[block_id] is not None:
            return
        if key in self._block_of_key:
            return
        self._key_of_block[block_id] = key
        self._block_of_key[key] = block_id

    def drop_cached(self, keep_version: Optional[int] = None) -> int:
        """Forget cached contents (of versions other than ``keep_version``; all when None).
        Evictable ones return to the free list; in-use ones stay held but unregistered."""
        dropped = 0
        for key, block_id in list(self._block_of_key.items()):
            if keep_version is not None and key[2] == keep_version:
                continue
            del self._block_of_key[key]
            self._key_of_block[block_id] = None
            if block_id in self._evictable:
                del self._evictable[block_id]
                self._free.append(block_id)
            dropped += 1
        return dropped

    # ---------------------------------------------------------------- holding blocks
    def take(self, block_ids: Sequence[int]) -> None:
        """Add an active reference to already-populated blocks (a prefix-cache hit or a shared prompt)."""
        refs, idle = self._ref_counts, self._idle_counts
        for block_id in block_ids:
            rc = refs[block_id]
            if rc == 0:
                assert block_id in self._evictable, f"take of a free block {block_id}"
                del self._evictable[block_id]
            elif rc == idle[block_id]:
                self._num_reclaimable -= 1     # an active holder now: offloading the idle ones frees nothing
            refs[block_id] = rc + 1

    def allocate(self) -> int:
        """Hand out one fresh block (the caller checked ``num_unheld`` > 0): a free one, else the least
        recently used evictable one (its cached contents are given up)."""
        if self._free:
            block_id = self._free.popleft()
        else:
            assert self._evictable, "allocate with no free or evictable block"
            block_id, _ = self._evictable.popitem(last=False)
            key = self._key_of_block[block_id]
            assert key is not None
            del self._block_of_key[key]
            self._key_of_block[block_id] = None
            self.num_evictions += 1
        assert self._ref_counts[block_id] == 0
        self._ref_counts[block_id] = 1
        return block_id

    def release(self, block_ids: Sequence[int], idle: bool = False) -> None:
        """Drop one reference (an idle one with ``idle``) from each block. Pass a sequence's blocks tail
        first, so that the LRU order evicts the ends of prefixes before their beginnings."""
        refs, idles = self._ref_counts, self._idle_counts
        for block_id in block_ids:
            rc, ic = refs[block_id], idles[block_id]
            assert rc > 0, f"release of free block {block_id}"
            was = rc == ic
            assert idle or rc > ic, f"active release of block {block_id}, which only parked sessions hold"
            if idle:
                assert ic > 0, f"idle release of block {block_id} without an idle holder"
                idles[block_id] = ic = ic - 1
            rc -= 1
            refs[block_id] = rc
            if rc == 0:
                if was:
                    self._num_reclaimable -= 1
                if self._key_of_block[block_id] is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)
            else:
                self._num_reclaimable += (rc == ic) - was

    def park(self, block_ids: Sequence[int]) -> None:
        """Turn one active reference to each block into an idle one (its holder stops running)."""
        refs, idles = self._ref_counts, self._idle_counts
        for block_id in block_ids:
            ic = idles[block_id] + 1
            assert ic <= refs[block_id], f"park of block {block_id}: more idle holders than holders"
            idles[block_id] = ic
            if ic == refs[block_id]:
                self._num_reclaimable += 1

    def unpark(self, block_ids: Sequence[int]) -> None:
        """Turn one idle reference to each block back into an active one."""
        refs, idles = self._ref_counts, self._idle_counts
        for block_id in block_ids:
            ic = idles[block_id]
            assert ic > 0, f"unpark of block {block_id} without an idle holder"
            if ic == refs[block_id]:
                self._num_reclaimable -= 1
            idles[block_id] = ic - 1

    # ---------------------------------------------------------------- invariants
    def check_integrity(self, held: Optional[dict[int, int]] = None, idle: Optional[dict[int, int]] = None) -> None:
        """Assert the accounting identity; with ``held`` / ``idle`` (block id -> number of holders / of
        parked holders, as the scheduler counts them) also that every count equals its holders."""
        free = set(self._free)
        evictable = set(self._evictable)
        assert len(free) == len(self._free), "duplicate ids in the free list"
        assert not (free & evictable), "a block is both free and evictable"
        in_use = {b for b in range(self.num_blocks) if self._ref_counts[b] > 0}
        assert not (in_use & (free | evictable)), "a held block is on a free/evictable list"
        assert len(free) + len(evictable) + len(in_use) == self.num_blocks, (
            f"free {len(free)} + evictable {len(evictable)} + in use {len(in_use)} != total {self.num_blocks}")
        for b in free:
            assert self._key_of_block[b] is None, f"free block {b} still registered"
        for b in evictable:
            assert self._key_of_block[b] is not None, f"evictable block {b} not registered"
        for key, b in self._block_of_key.items():
            assert self._key_of_block[b] == key, f"cache map and block key disagree for block {b}"
        reclaimable = sum(1 for b in range(self.num_blocks) if self.is_reclaimable(b))
        assert reclaimable == self._num_reclaimable, f"reclaimable {self._num_reclaimable} != counted {reclaimable}"
        for b in range(self.num_blocks):
            assert 0 <= self._idle_counts[b] <= self._ref_counts[b], f"block {b}: idle holders exceed holders"
        if held is not None:
            for b in range(self.num_blocks):
                assert self._ref_counts[b] == held.get(b, 0), (
                    f"block {b}: ref count {self._ref_counts[b]} != holders {held.get(b, 0)}")
        if idle is not None:
            for b in range(self.num_blocks):
                assert self._idle_counts[b] == idle.get(b, 0), (
                    f"block {b}: idle count {self._idle_counts[b]} != parked holders {idle.get(b, 0)}")

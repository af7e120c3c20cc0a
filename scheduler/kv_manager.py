"""Device block tables, the one ledger of reservations, n > 1 forks and in-flight prefix blocks.

The only writer of a sequence's device KV state (``block_ids``, ``block_keys``, ``inflight_keys``,
``context_keys``) and of the reservation ledger. Host copies and the parked set belong to the offload
manager (``scheduler.kv_offload``), which this class asks for room through ``reclaim``.

Reservations are a count of blocks promised to a running sequence and not yet allocated. The promise
holds because admission keeps

    reserved <= unheld + reclaimable

(unheld = free + evictable; reclaimable = blocks only parked sessions hold): an allocation against a
reservation takes an unheld block, or first has parked sessions give theirs back (offloaded to the
host pool, or dropped when it is full). Nothing running is ever touched to keep a promise.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence as Seq
from typing import Optional

from scheduler.block_pool import BlockKey, BlockPool, block_keys
from scheduler.request import KVLocation, Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVManager:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.weight_version = 0
        self._reserved: dict[int, int] = {}   # seq id -> blocks promised and not yet allocated
        self.num_reserved = 0
        self._inflight: dict[BlockKey, int] = {}   # block key -> running sequences about to compute it
        self.block_copies: list[tuple[int, int]] = []   # forks' partial-block copies for the next output
        # Frees n unheld blocks by moving parked sessions' KV away (set by the offload manager).
        self.reclaim: Callable[[int], None] = self._no_reclaim

    @staticmethod
    def _no_reclaim(n: int) -> None:
        raise AssertionError(f"no unheld block and nothing to reclaim {n} blocks from")

    # ------------------------------------------------------------------ capacity
    @property
    def headroom(self) -> int:
        """Blocks a new promise may still claim: unheld + reclaimable - reserved (>= 0 always)."""
        return self.pool.num_unheld + self.pool.num_reclaimable - self.num_reserved

    def reserved(self, seq: Sequence) -> int:
        return self._reserved.get(seq.seq_id, 0)

    def reserve(self, seq: Sequence, n: int) -> None:
        assert 0 <= n <= self.headroom, f"reserve({n}) exceeds the headroom {self.headroom}"
        if n:
            self._reserved[seq.seq_id] = self._reserved.get(seq.seq_id, 0) + n
            self.num_reserved += n

    def unreserve(self, seq: Sequence) -> int:
        """Give back what ``seq`` still has promised; returns how much."""
        n = self._reserved.pop(seq.seq_id, 0)
        self.num_reserved -= n
        return n

    def transfer_reservation(self, src: Sequence, dst: Sequence, n: int) -> None:
        """n > 1: the leader reserved for its siblings; each gets its share when it forks off."""
        have = self._reserved.get(src.seq_id, 0)
        assert 0 <= n <= have, f"transfer of {n} blocks from a reservation of {have}"
        if n == 0:
            return
        if have == n:
            del self._reserved[src.seq_id]
        else:
            self._reserved[src.seq_id] = have - n
        self._reserved[dst.seq_id] = self._reserved.get(dst.seq_id, 0) + n

    # ------------------------------------------------------------------ blocks
    def allocate(self, seq: Sequence) -> int:
        """Append one fresh block to ``seq``'s table, from its reservation if it has one (else the caller
        checked ``headroom`` > 0). Parked sessions give a block back first when none is unheld."""
        r = self._reserved.get(seq.seq_id, 0)
        if r:
            if r == 1:
                del self._reserved[seq.seq_id]
            else:
                self._reserved[seq.seq_id] = r - 1
            self.num_reserved -= 1
        else:
            assert self.headroom > 0, f"sequence {seq.seq_id} grew past its reservation with no headroom"
        if self.pool.num_unheld == 0:
            self.reclaim(1)
        block = self.pool.allocate()
        seq.block_ids.append(block)
        return block

    def take(self, seq: Sequence, hits: list[int], keys: list[BlockKey]) -> None:
        """Start ``seq``'s table on prefix-cache hits (its computed prefix)."""
        self.pool.take(hits)
        seq.block_ids = list(hits)
        seq.block_keys = list(keys)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.kv = KVLocation.DEVICE

    def trim(self, seq: Sequence) -> None:
        """Give back blocks past the last computed token (a block taken for a decode scheduled ahead that
        never ran), so a parked session holds exactly its KV."""
        keep = cdiv(seq.num_computed_tokens, self.block_size)
        if len(seq.block_ids) > keep:
            self.pool.release(seq.block_ids[keep:][::-1])
            del seq.block_ids[keep:]

    def fork(self, leader: Sequence, fork: Sequence, shared: int, computed: int, reservation: int) -> None:
        """A sibling starts on the leader's first ``shared`` blocks with ``computed`` tokens of KV and its
        share of the leader's reservation."""
        self.pool.take(leader.block_ids[:shared])
        fork.block_ids = leader.block_ids[:shared]
        fork.block_keys = leader.block_keys[:shared]
        fork.num_computed_tokens = computed
        fork.kv = KVLocation.DEVICE
        self.transfer_reservation(leader, fork, reservation)

    def copy_partial_block(self, leader: Sequence, fork: Sequence) -> None:
        """The fork appends its own tokens to a copy of the leader's partial last prompt block."""
        src = leader.block_ids[len(fork.block_ids)]
        self.block_copies.append((src, self.allocate(fork)))

    # ------------------------------------------------------------------ prefix cache
    def context_hits(self, seq: Sequence) -> tuple[list[int], list[BlockKey], Optional[BlockKey]]:
        """Blocks of ``seq``'s context in the prefix cache, their keys, and the key of the first cacheable
        block that missed (None if all hit). For a host-resident sequence: its own offloaded blocks that
        are still cached on the device."""
        if not self.pool.enable_prefix_caching:
            return [], [], None
        if seq.kv is KVLocation.HOST:
            keys = seq.block_keys[:len(seq.host_block_ids)]
        else:
            # At least one context token is always computed, so the step yields logits to sample.
            # Cached on the sequence: a queued head is retried every step.
            stamp = (seq.num_tokens, self.weight_version)
            if seq.context_keys is None or seq.context_keys[0] != stamp:
                num_cacheable = (seq.num_tokens - 1) // self.block_size * self.block_size
                seq.context_keys = (stamp, block_keys(seq.token_ids, self.block_size, self.weight_version,
                                                      num_tokens=num_cacheable))
            keys = seq.context_keys[1]
        hits = self.pool.match_prefix(keys)
        return hits, keys[:len(hits)], keys[len(hits)] if len(keys) > len(hits) else None

    def is_inflight(self, key: BlockKey) -> bool:
        return key in self._inflight

    def track_inflight(self, seq: Sequence) -> None:
        """Remember the keys of the full context blocks ``seq`` is about to compute."""
        if not self.pool.enable_prefix_caching:
            return
        num_full = seq.num_tokens // self.block_size
        seq.inflight_keys = deque(block_keys(seq.token_ids, self.block_size, self.weight_version,
                                             len(seq.block_keys), seq.block_keys, num_full * self.block_size))
        for key in seq.inflight_keys:
            self._inflight[key] = self._inflight.get(key, 0) + 1

    def untrack_inflight(self, seq: Sequence, key: Optional[BlockKey] = None) -> None:
        """Forget ``key`` (computed now) if it is ``seq``'s next in-flight key; all when None."""
        while seq.inflight_keys and (key is None or seq.inflight_keys[0] == key):
            k = seq.inflight_keys.popleft()
            n = self._inflight[k] - 1
            if n:
                self._inflight[k] = n
            else:
                del self._inflight[k]
            if key is not None:
                break

    def register_full_blocks(self, seq: Sequence) -> None:
        """Enter ``seq``'s newly completed full blocks in the prefix cache."""
        num_full = seq.num_computed_tokens // self.block_size
        if num_full > len(seq.block_keys):
            new_keys = block_keys(seq.token_ids, self.block_size, self.weight_version,
                                  len(seq.block_keys), seq.block_keys, num_full * self.block_size)
            for i, key in enumerate(new_keys, start=len(seq.block_keys)):
                self.pool.register(seq.block_ids[i], key)
                self.untrack_inflight(seq, key)
            seq.block_keys.extend(new_keys)

    def set_weight_version(self, version: int) -> None:
        """New weights: cached blocks of other versions are never reused."""
        self.weight_version = version
        self.pool.drop_cached(keep_version=version)

    # ------------------------------------------------------------------ invariants
    def check_integrity(self, seqs: Seq[Sequence], running: Seq[Sequence]) -> None:
        assert sum(self._reserved.values()) == self.num_reserved, "reservation ledger total out of sync"
        assert all(n > 0 for n in self._reserved.values()), "an empty reservation is kept"
        running_ids = {s.seq_id for s in running}
        assert set(self._reserved) <= running_ids, "a sequence that is not running holds a reservation"
        assert 0 <= self.num_reserved <= self.pool.num_unheld + self.pool.num_reclaimable, (
            f"reserved {self.num_reserved} > unheld {self.pool.num_unheld} + reclaimable {self.pool.num_reclaimable}")
        for seq in seqs:
            if seq.kv is KVLocation.DEVICE:
                assert len(seq.block_ids) >= cdiv(seq.num_computed_tokens, self.block_size)
        inflight: dict = {}
        for seq in running:
            for key in seq.inflight_keys:
                inflight[key] = inflight.get(key, 0) + 1
        assert inflight == self._inflight, "in-flight prefix keys out of sync"

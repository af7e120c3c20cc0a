"""Admission: which queued turn or request starts next, and whether its KV fits.

Order: a turn waiting ``aging_steps`` steps, or a sequence moved out while running (swap mode, the
recompute baseline), goes first; then turns of sessions whose KV is on the device, then sessions whose KV
is on the host, then new work; higher session ``priority`` first, FCFS within a class.

The rule (no preemption, by construction): a turn is admitted when the blocks its policy reserves fit in

    unheld + reclaimable - reserved

after it takes its prefix-cache hits (an evictable hit leaves ``unheld``; a hit only idle sessions held
leaves ``reclaimable``) and stops being idle itself (its own exclusively held blocks leave
``reclaimable``). Reclaimable blocks are those only parked sessions hold: they go to the host pool (or are
dropped when it is full) when — and only when — an admitted sequence actually needs a block and none is
unheld. So nothing is moved to admit a turn, and a reservation is never broken.
"""
from __future__ import annotations

import enum

from scheduler.kv_manager import KVManager
from scheduler.kv_offload import OffloadManager
from scheduler.policy import PreemptionPolicy
from scheduler.request import KVLocation, Sequence, SequenceStatus


class Verdict(enum.Enum):
    ADMITTED = "admitted"
    DEFERRED = "deferred"   # admissible next step: its next prompt block is being computed by a running
    #                         sequence (it hits the cache then), or its KV left for the host in this step
    BLOCKED = "blocked"     # does not fit now


class Admission:
    def __init__(self, kv: KVManager, offload: OffloadManager, policy: PreemptionPolicy, aging_steps: int) -> None:
        self.kv = kv
        self.offload = offload
        self.policy = policy
        self.aging_steps = aging_steps

    def key(self, seq: Sequence, step: int) -> tuple:
        if seq.preempted or step - seq.enqueued_step >= self.aging_steps:
            cls = 0                                   # moved out while running, or aged: ahead of every class
        elif seq.session_id is not None and seq.kv is KVLocation.DEVICE:
            cls = 1                                   # resident session turn
        elif seq.kv is KVLocation.HOST:
            cls = 2                                   # offloaded session turn
        else:
            cls = 3                                   # new work (or a dropped session)
        return (cls, -seq.priority, seq.arrival)

    def try_admit(self, seq: Sequence) -> Verdict:
        """Admit ``seq`` if it fits: unpark it, take its prefix hits, reserve, start its restore."""
        kv, pool = self.kv, self.kv.pool
        if seq.seq_id in self.offload.leaving:
            # offloaded earlier in this very step: its host copy is written by this step's output, so it can
            # only be read back by a later one
            return Verdict.DEFERRED
        resident = seq.kv is KVLocation.DEVICE
        hits, keys, next_key = ([], [], None) if resident else kv.context_hits(seq)
        if next_key is not None and kv.is_inflight(next_key):
            return Verdict.DEFERRED
        need = self.policy.group_blocks(seq, len(seq.block_ids) + len(hits))
        parked = seq.seq_id in self.offload.parked
        lost = pool.num_evictable_among(hits) + pool.num_reclaimable_among(hits)
        if parked and resident:
            lost += pool.num_reclaimable_among(seq.block_ids)
        if need > kv.headroom - lost:
            return Verdict.BLOCKED
        self.offload.unpark(seq)
        seq.status = SequenceStatus.RUNNING
        seq.preempted = False
        if seq.kv is KVLocation.HOST:
            pool.take(hits)
            seq.block_ids = list(hits)
            kv.reserve(seq, need)
            self.offload.restore(seq)
        else:
            if seq.kv is KVLocation.NONE:
                kv.take(seq, hits, keys)
            kv.reserve(seq, need)
        kv.track_inflight(seq)
        return Verdict.ADMITTED

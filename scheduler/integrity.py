"""``check_integrity``: the scheduler's invariants, asserted by the tests after every step of every scenario.

1. A running sequence holds a reservation for what its policy promised; the ledger's total equals the sum
   over sequences, and ``reserved <= unheld + reclaimable``.
2. ``free + evictable + in_use == total`` device blocks; every block's ref count equals its holders and its
   idle count equals its parked holders; the host pool's held blocks are exactly the host-resident ones.
3. A sequence's KV is on the device, on the host, or gone — never half of each; only running sequences
   hold reservations; a parked session is never running.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from scheduler.kv_manager import cdiv
from scheduler.request import KVLocation, SequenceStatus

if TYPE_CHECKING:
    from scheduler.scheduler import Scheduler


def check_scheduler(s: "Scheduler") -> None:
    parked = s.offload.parked
    seqs = list(s.running.values()) + list(parked.values()) + [q for q in s.waiting if q.seq_id not in parked]
    assert len({q.seq_id for q in seqs}) == len(seqs), "a sequence is both running and parked/waiting"
    held: dict[int, int] = {}
    idle: dict[int, int] = {}
    host_held: set[int] = set()
    for seq in seqs:
        if seq.kv is KVLocation.DEVICE:
            for b in seq.block_ids:
                held[b] = held.get(b, 0) + 1
                if seq.seq_id in parked and seq.kv_ready:
                    idle[b] = idle.get(b, 0) + 1
        elif seq.kv is KVLocation.HOST:
            assert not seq.block_ids and len(seq.host_block_ids) == cdiv(seq.num_computed_tokens, s.block_size)
            assert not host_held & set(seq.host_block_ids), "a host block has two holders"
            host_held.update(seq.host_block_ids)
            assert seq.kv_ready
        else:
            assert not seq.block_ids and not seq.host_block_ids and seq.num_computed_tokens == 0 and seq.kv_ready
        assert seq.num_computed_tokens <= seq.num_tokens
        if seq.status is SequenceStatus.RUNNING:
            assert seq.kv is KVLocation.DEVICE and seq.seq_id not in parked
    for b in s.offload.held_blocks():
        held[b] = held.get(b, 0) + 1
    for seq in s.waiting:
        assert seq.status is SequenceStatus.WAITING
        assert seq.session_id is not None or seq.kv is not KVLocation.DEVICE, "a queued request holds device KV"
    for seq in parked.values():
        assert seq.session_id is not None and seq.status in (SequenceStatus.AWAITING_INPUT, SequenceStatus.WAITING)
    s.kv.check_integrity(seqs, list(s.running.values()))
    s.pool.check_integrity(held, idle)
    s.host.check_integrity(host_held)

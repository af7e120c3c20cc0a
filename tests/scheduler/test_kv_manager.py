"""The KV manager (scheduler.kv_manager): one ledger of reservations, headroom = unheld + reclaimable -
reserved, allocation that has parked sessions give a block back only when none is unheld."""
import pytest

from scheduler import BlockPool, Scheduler, SchedulerConfig, StopCondition
from scheduler.kv_manager import KVManager
from scheduler.request import Sequence


def seq(i):
    return Sequence(seq_id=i, request_id=f"r{i}", sample_index=0, token_ids=[1], num_prompt_tokens=1,
                    stop=StopCondition(max_tokens=1), arrival=i)


def test_ledger_reserve_allocate_transfer_unreserve():
    kv = KVManager(BlockPool(8, 4))
    a, b = seq(0), seq(1)
    kv.reserve(a, 5)
    assert kv.num_reserved == 5 and kv.headroom == 3
    kv.allocate(a)                                  # against the reservation
    assert kv.reserved(a) == 4 and kv.num_reserved == 4 and kv.headroom == 3
    kv.transfer_reservation(a, b, 3)                # a leader hands a sibling its share
    assert kv.reserved(a) == 1 and kv.reserved(b) == 3 and kv.num_reserved == 4
    kv.allocate(b)
    kv.allocate(b)
    assert kv.unreserve(b) == 1 and kv.unreserve(a) == 1 and kv.num_reserved == 0
    assert kv.headroom == 8 - 3
    with pytest.raises(AssertionError, match="headroom"):
        kv.reserve(a, 6)
    with pytest.raises(AssertionError, match="transfer"):
        kv.transfer_reservation(a, b, 1)            # a has nothing promised left


def test_allocation_reclaims_only_when_no_block_is_unheld():
    pool = BlockPool(4, 4)
    kv = KVManager(pool)
    idle = seq(9)
    idle.block_ids = [pool.allocate() for _ in range(3)]
    pool.park(idle.block_ids)                       # a parked session holds 3: reclaimable
    calls = []

    def reclaim(n):
        calls.append(pool.num_unheld)
        pool.release(idle.block_ids[::-1], idle=True)
        idle.block_ids = []
    kv.reclaim = reclaim
    a = seq(0)
    assert kv.headroom == 4
    kv.reserve(a, 2)
    kv.allocate(a)                                  # the one unheld block: no reclaim
    assert calls == []
    kv.allocate(a)                                  # none unheld: the parked session gives its blocks back
    assert calls == [0] and len(a.block_ids) == 2 and pool.num_unheld == 2


def test_the_scheduler_keeps_one_ledger():
    s = Scheduler(SchedulerConfig(num_blocks=32, block_size=4, max_num_batched_tokens=64))
    s.add_request("g", list(range(1, 19)), StopCondition(max_tokens=6), n=3)
    s.schedule()
    leader = next(iter(s.running.values()))
    assert s.kv.num_reserved == s.kv.reserved(leader) > 0
    assert not hasattr(leader, "num_reserved_blocks") and not hasattr(s.pool, "num_reserved")
    s.check_integrity()

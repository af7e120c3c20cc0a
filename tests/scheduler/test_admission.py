"""Admission against what idle sessions can give back (scheduler.admission): a turn is admitted when its
worst case fits in unheld blocks plus the blocks only parked sessions hold, minus what its own prefix
hits and its own blocks take out of those; nothing moves at admission, and parked sessions' KV goes to the
host pool (or is dropped) only when an admitted sequence actually needs a block."""
import random

import pytest

from scheduler import KVLocation, Scheduler, SchedulerConfig, StopCondition
from tests.scheduler.fake_engine import FakeKVEngine, RandomSessions, reference_output

VOCAB = 60
SYSTEM = list(range(1, 17))          # a 16-token system prompt: 4 full blocks of 4, shared by every session


def make(**kw):
    cfg = dict(num_blocks=16, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
    cfg.update(kw)
    return Scheduler(SchedulerConfig(**cfg), clock=lambda: 0.0)


def run_until(eng, s, rid):
    while True:
        _, fin = eng.step()
        for f in fin:
            if f.request_id == rid:
                return f


@pytest.mark.parametrize("host_blocks", [0, 32])
def test_own_prefix_hits_are_not_counted_as_freeable(host_blocks):
    """Review fix: the admitting request's prefix hits on an idle session's blocks free nothing when that
    session goes away. Before, the head was admissible on paper, the idle session was dropped (host pool 0)
    or offloaded, and the admission still failed."""
    s = make(num_host_blocks=host_blocks)
    eng = FakeKVEngine(s, VOCAB)
    s.open_session("a")
    s.submit_turn("a", "a1", SYSTEM + [20, 21, 22, 23], StopCondition(max_tokens=4))
    run_until(eng, s, "a1")                                         # a parks 6 blocks: 4 system + 2 its own
    assert len(s.get_session("a").block_ids) == 6
    s.add_request("c", [30] * 8, StopCondition(max_tokens=16))      # holds 2 blocks, 4 more reserved
    eng.step()
    s.add_request("b", SYSTEM + [40] * 8, StopCondition(max_tokens=20))   # 11 blocks: 4 hits + 7 new
    out, _ = eng.step()
    assert "b" not in {it.request_id for it in out.scheduled}       # 7 > 16 - 2 - 6 + 6 - 4 - 4 hits = 6
    a = s.get_session("a")
    assert a.kv is KVLocation.DEVICE and len(a.block_ids) == 6      # nothing moved for an admission that fails
    assert s.stats.dropped_sessions == 0 and s.stats.offloaded_sessions == 0
    fin = {f.request_id: f for f in eng.run()}                      # c finishes, then b fits without a's blocks
    assert fin["b"].output_token_ids == reference_output(SYSTEM + [40] * 8, 20, VOCAB)
    assert fin["b"].num_cached_tokens == 16
    assert s.stats.dropped_sessions == 0 and s.stats.offloaded_sessions == 0
    assert s.get_session("a").kv is KVLocation.DEVICE


def test_admission_counts_idle_blocks_and_moves_them_only_when_needed():
    s = make(num_blocks=12, num_host_blocks=32, enable_prefix_caching=False)
    eng = FakeKVEngine(s, VOCAB)
    s.open_session("a")
    s.submit_turn("a", "a1", list(range(1, 28)), StopCondition(max_tokens=4))   # a parks ceil(30/4) = 8 blocks
    run_until(eng, s, "a1")
    assert s.pool.num_unheld == 4 and s.pool.num_reclaimable == 8 and s.kv.headroom == 12
    s.add_request("b", list(range(30, 36)), StopCondition(max_tokens=20))   # 7 blocks: fits only counting a's
    out, _ = eng.step()
    assert [it.request_id for it in out.scheduled] == ["b"]          # admitted now
    assert s.get_session("a").kv is KVLocation.DEVICE                # its 2 blocks came from the unheld 4
    assert out.swap_out == [] and s.stats.offloaded_sessions == 0
    while s.get_session("a").kv is KVLocation.DEVICE:                # b grows: a goes to the host pool once the
        out, _ = eng.step()                                          # 4 unheld blocks are used up
        assert s.running
    assert len(out.swap_out) == 8 and s.get_session("a").kv is KVLocation.HOST
    fin = eng.run()
    assert fin[0].output_token_ids == reference_output(list(range(30, 36)), 20, VOCAB)
    assert s.stats.preemptions == 0 and s.stats.dropped_sessions == 0


def test_a_parked_sessions_own_blocks_do_not_count_for_its_next_turn():
    s = make(num_blocks=12, num_host_blocks=0, enable_prefix_caching=False)
    eng = FakeKVEngine(s, VOCAB)
    s.open_session("a")
    s.submit_turn("a", "a1", list(range(1, 28)), StopCondition(max_tokens=4))   # 8 blocks held
    run_until(eng, s, "a1")
    s.add_request("c", [5] * 6, StopCondition(max_tokens=8))      # 4 blocks reserved: headroom 12 - 4 = 8
    eng.step()
    s.submit_turn("a", "a2", [7] * 12, StopCondition(max_tokens=4))   # a needs cdiv(45, 4) = 12 - 8 held = 4
    out, _ = eng.step()
    # headroom 8 counts a's own 8 reclaimable blocks; without them 0 < 4: a waits, c runs, nothing dropped
    assert "a2" not in {it.request_id for it in out.scheduled} and s.stats.dropped_sessions == 0
    fin = {f.request_id: f for f in eng.run()}
    assert fin["a2"].num_prefill_tokens == 12 and s.stats.dropped_sessions == 0


def test_randomized_shared_prefixes_under_pressure_move_kv_only_when_a_block_is_needed():
    """Sessions sharing a system prompt, tiny pools, host pools of 0 / small / large, restores landing 0-3
    steps late: every offload or drop happens inside an allocation that found no unheld block (so an
    admission that fails moves nothing), outputs equal the reference, nothing is ever preempted."""
    rng = random.Random(11)
    moved = 0
    for scenario in range(200):
        s = make(num_blocks=rng.randint(14, 30), num_host_blocks=rng.choice([0, 6, 64]),
                 max_num_seqs=rng.randint(1, 6), max_num_batched_tokens=rng.randint(4, 40),
                 enable_prefix_caching=rng.random() < 0.8)
        eng = FakeKVEngine(s, VOCAB, landing_delay=rng.choice([0, 0, 1, 3]))
        calls = []
        original = s.offload.reclaim

        def reclaim(n, original=original, s=s, calls=calls):
            calls.append(s.pool.num_unheld)
            original(n)
        s.kv.reclaim = reclaim
        sessions = RandomSessions(s, rng, VOCAB, {f"s{i}": rng.randint(1, 4) for i in range(rng.randint(2, 7))},
                                  SYSTEM[:rng.choice([0, 4, 8, 16])], 0.6, (1, 8), (1, 8))
        steps = 0
        while not sessions.done:
            sessions.submit()
            before = (s.stats.offloaded_sessions, s.stats.dropped_sessions)
            _, fin = eng.step(check=True)
            if (s.stats.offloaded_sessions, s.stats.dropped_sessions) != before:
                assert calls, "KV moved outside an allocation"
            assert all(unheld == 0 for unheld in calls), (scenario, calls)
            calls.clear()
            sessions.check(fin, scenario)
            steps += 1
            assert steps < 20_000
        assert not sessions.expected, scenario
        moved += s.stats.offloaded_sessions + s.stats.dropped_sessions
        assert s.stats.preemptions == 0 and s.stats.recomputed_tokens == 0
        for sid in list(s.sessions):
            s.close_session(sid)
        while s.offload.num_landing:            # a copy still in flight for a closed session lands
            eng.step(check=True)
        s.check_integrity()
        assert s.pool.num_in_use == 0 and s.kv.num_reserved == 0 and s.host.num_free == s.host.num_blocks
    assert moved > 50, moved

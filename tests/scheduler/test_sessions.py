"""Sessions in the scheduler: KV kept between turns, reservation admission with host offload under
pressure, never a preemption; driven by the fake KV engine (contexts read back through the block
tables, host copies simulated), so wrong offload/restore bookkeeping changes the outputs."""
import random

import pytest

from scheduler import KVLocation, Scheduler, SchedulerConfig, SessionError, StopCondition
from tests.scheduler.fake_engine import FakeKVEngine, RandomSessions, reference_output, run_turn

VOCAB = 60


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make(clock=None, **kw):
    cfg = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=512)
    cfg.update(kw)
    return Scheduler(SchedulerConfig(**cfg), clock=clock or Clock())


def test_turns_prefill_only_new_tokens():
    s = make()
    eng = FakeKVEngine(s, VOCAB)
    s.open_session("a")
    f1 = run_turn(s, eng, "a", "t1", [1, 2, 3, 4, 5, 6, 7], 5)
    assert f1.num_prefill_tokens == 7 and f1.num_cached_tokens == 0
    f2 = run_turn(s, eng, "a", "t2", [8, 9, 10], 4)
    # 3 new tokens computed as prefill; the previous turn's last sampled token as a decode
    assert f2.num_prefill_tokens == 3
    assert f2.num_cached_tokens == 7 + 5 - 1
    f3 = run_turn(s, eng, "a", "t3", [], 2)       # empty observation: just continue
    assert f3.num_prefill_tokens == 0
    assert s.stats.preemptions == 0
    s.close_session("a")
    s.check_integrity()
    assert s.pool.num_in_use == 0


def test_no_retention_baseline_reprefills_history():
    s = make(retain_sessions=False, enable_prefix_caching=False)
    eng = FakeKVEngine(s, VOCAB)
    s.open_session("a")
    run_turn(s, eng, "a", "t1", [1, 2, 3, 4, 5, 6, 7], 5)
    f2 = run_turn(s, eng, "a", "t2", [8, 9, 10], 4)
    assert f2.num_prefill_tokens == 7 + 3 and f2.num_cached_tokens == 0


def test_offload_restore_under_pressure_and_drop_when_host_full():
    # 12 blocks of 4: one session with a 30-token context holds 8 blocks.
    for host_blocks, expect in ((16, "restored"), (0, "dropped")):
        s = make(num_blocks=12, num_host_blocks=host_blocks, enable_prefix_caching=False)
        eng = FakeKVEngine(s, VOCAB)
        s.open_session("a")
        s.open_session("b")
        run_turn(s, eng, "a", "a1", list(range(1, 28)), 4)        # a holds ceil(30/4) = 8 blocks
        assert s.get_session("a").kv is KVLocation.DEVICE
        run_turn(s, eng, "b", "b1", list(range(30, 50)), 8)       # b needs 7: a must give way
        a = s.get_session("a")
        assert a.kv is (KVLocation.HOST if host_blocks else KVLocation.NONE)
        f = run_turn(s, eng, "a", "a2", [5, 5, 5], 3)
        if expect == "restored":
            assert s.stats.offloaded_blocks >= 8 and s.stats.restored_sessions == 1
            assert f.num_prefill_tokens == 3
        else:
            assert s.stats.dropped_sessions == 2          # a for b's turn, then b for a's
            assert f.num_prefill_tokens == 27 + 3         # the history is prefilled again
        assert s.stats.preemptions == 0


def test_ttl_expiry_frees_everything():
    clock = Clock()
    s = make(clock=clock)
    eng = FakeKVEngine(s, VOCAB)
    s.open_session("a", ttl_s=5.0)
    s.open_session("b", ttl_s=50.0)
    run_turn(s, eng, "a", "a1", list(range(1, 20)), 3)
    run_turn(s, eng, "b", "b1", list(range(1, 10)), 3)
    clock.t = 10.0
    s.schedule()
    assert "a" not in s.sessions and "b" in s.sessions and s.stats.expired_sessions == 1
    with pytest.raises(SessionError, match="closed"):
        s.submit_turn("a", "a2", [1], StopCondition(max_tokens=1))
    s.close_session("b")
    s.check_integrity()
    assert s.pool.num_in_use == 0


def test_session_errors_disturb_nothing():
    s = make()
    eng = FakeKVEngine(s, VOCAB)
    s.open_session("a")
    s.open_session("b")
    with pytest.raises(SessionError, match="already open"):
        s.open_session("a")
    with pytest.raises(SessionError, match="unknown"):
        s.submit_turn("zzz", "t", [1], StopCondition(max_tokens=1))
    with pytest.raises(ValueError, match="first turn"):
        s.submit_turn("a", "t0", [], StopCondition(max_tokens=1))
    s.submit_turn("a", "a1", [1, 2, 3], StopCondition(max_tokens=6))
    with pytest.raises(SessionError, match="in progress"):
        s.submit_turn("a", "a1b", [4], StopCondition(max_tokens=1))
    with pytest.raises(ValueError, match="already in use"):
        s.submit_turn("b", "a1", [4], StopCondition(max_tokens=1))
    with pytest.raises(ValueError, match="KV blocks"):
        s.submit_turn("b", "huge", list(range(300)), StopCondition(max_tokens=100))
    assert s.get_session("b").token_ids == []       # the rejected turn appended nothing
    eng.step()
    f = run_turn(s, eng, "b", "b1", [7, 8], 3)       # b is unaffected
    assert f.finish_reason == "length"
    while s.has_unfinished():
        eng.step()
    assert s.get_session("a").token_ids[:3] == [1, 2, 3] and len(s.get_session("a").token_ids) == 9
    fin = s.close_session("a")
    assert fin == []
    with pytest.raises(SessionError, match="closed"):
        s.close_session("a")


def test_close_session_with_turn_running_aborts_it():
    s = make()
    eng = FakeKVEngine(s, VOCAB)
    s.open_session("a")
    s.submit_turn("a", "a1", list(range(1, 10)), StopCondition(max_tokens=50))
    eng.step()
    eng.step()
    fin = s.close_session("a")
    assert len(fin) == 1 and fin[0].finish_reason == "aborted" and fin[0].session_id == "a"
    s.check_integrity()
    assert s.pool.num_in_use == 0 and s.kv.num_reserved == 0 and not s.has_unfinished()


def test_randomized_sessions_small_pool_never_preempt():
    rng = random.Random(7)
    waited = 0
    moved = 0
    for scenario in range(200):
        block_size = rng.choice([2, 4, 8])
        num_blocks = rng.randint(24, 60) // block_size * 4
        s = make(num_blocks=num_blocks, block_size=block_size, max_num_seqs=rng.randint(1, 6),
                 max_num_batched_tokens=rng.randint(4, 40), num_host_blocks=rng.choice([0, 8, 64]),
                 enable_prefix_caching=rng.random() < 0.7, max_model_len=256)
        eng = FakeKVEngine(s, VOCAB)
        sessions = RandomSessions(s, rng, VOCAB, {f"s{i}": rng.randint(1, 4) for i in range(rng.randint(1, 8))},
                                  [rng.randrange(VOCAB) for _ in range(rng.randint(0, 10))],   # GRPO-like prefix
                                  0.5, (1, 12), (1, 10))
        steps = 0
        while not sessions.done:
            sessions.submit()
            if s.waiting and s.running:
                waited += 1
            _, fin = eng.step(check=True)
            sessions.check(fin, scenario)
            steps += 1
            assert steps < 20_000
        assert not sessions.expected, scenario
        moved += s.stats.offloaded_sessions + s.stats.dropped_sessions
        assert s.stats.preemptions == 0 and s.stats.recomputed_tokens == 0
        for sid in list(s.sessions):
            s.close_session(sid)
        s.check_integrity()
        assert s.pool.num_in_use == 0 and s.kv.num_reserved == 0
        assert s.host.num_free == s.host.num_blocks
    assert waited > 50 and moved > 50, (waited, moved)   # pressure really happened


def test_grpo_group_of_sessions_shares_prompt_blocks_submitted_together():
    s = make(block_size=4, max_num_batched_tokens=256)
    eng = FakeKVEngine(s, VOCAB)
    prompt = list(range(1, 41))                          # 40 tokens: 9 cacheable full blocks (36 tokens)
    for i in range(8):
        s.open_session(f"g{i}")
        s.submit_turn(f"g{i}", f"g{i}-0", prompt, StopCondition(max_tokens=5))
    fin = eng.run()
    assert len(fin) == 8 and all(f.output_token_ids == reference_output(prompt, 5, VOCAB) for f in fin)
    # the first computes the prompt; the other 7 wait one step and recompute only the last 4 tokens
    assert s.stats.prefill_tokens == 40 + 7 * 4
    assert sorted(f.num_cached_tokens for f in fin) == [0] + [36] * 7

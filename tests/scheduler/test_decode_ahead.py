"""Decode steps planned ahead (scheduler.decode_ahead): when they are planned, and that per-step housekeeping
(TTL expiry) runs in a long run of them too."""
from scheduler import Scheduler, SchedulerConfig, StopCondition
from tests.scheduler.fake_engine import FakeKVEngine


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make(clock, **kw):
    cfg = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512,
               num_host_blocks=32)
    cfg.update(kw)
    return Scheduler(SchedulerConfig(**cfg), clock=clock)


def chain(s, eng, out, steps, clock=None, dt=0.0):
    """Run ``steps`` decode steps each planned ahead of the previous one's update; -> how many were."""
    ahead_count = 0
    for _ in range(steps):
        ahead = s.schedule_decode_ahead(out)
        s.update(out, eng.execute(out))
        s.check_integrity()
        if ahead is None:
            return ahead_count
        ahead_count += 1
        out = ahead
        if clock is not None:
            clock.t += dt
    s.update(out, eng.execute(out))
    return ahead_count


def test_ttl_expiry_runs_in_a_long_run_of_decode_steps_planned_ahead():
    """Review fix: expiry ran only in schedule(); a long run of steps planned ahead never expired sessions."""
    clock = Clock()
    s = make(clock)
    eng = FakeKVEngine(s, 50)
    s.open_session("idle", ttl_s=1.0)
    s.submit_turn("idle", "i1", [1, 2, 3], StopCondition(max_tokens=2))
    while s.has_unfinished():
        eng.step()
    s.add_request("long", [5, 6, 7], StopCondition(max_tokens=200))
    out = s.schedule()
    s.update(out, eng.execute(out))                  # prefill: the next step is a pure decode
    out = s.schedule()
    assert chain(s, eng, out, 50, clock, dt=0.05) == 50
    assert "idle" not in s.sessions and s.stats.expired_sessions == 1   # 2.5 s of steps, all planned ahead
    assert s.pool.num_reclaimable == 0


def test_decode_ahead_stops_when_a_restore_lands_or_work_is_queued():
    clock = Clock()
    s = make(clock)
    eng = FakeKVEngine(s, 50)
    s.add_request("a", [1, 2, 3], StopCondition(max_tokens=40))
    out = s.schedule()
    s.update(out, eng.execute(out))
    out = s.schedule()
    assert s.schedule_decode_ahead(out) is not None    # nothing waiting: planned ahead
    s2 = make(clock)
    eng2 = FakeKVEngine(s2, 50)
    s2.add_request("a", [1, 2, 3], StopCondition(max_tokens=40))
    out = s2.schedule()
    s2.update(out, eng2.execute(out))
    out = s2.schedule()
    s2.add_request("b", [4, 5], StopCondition(max_tokens=4))
    assert s2.schedule_decode_ahead(out) is None       # b could be admitted: a full schedule must run
    s2.ready_changed = True
    s2.waiting.clear()
    assert s2.schedule_decode_ahead(out) is None       # a restore landed: its sequence must be scheduled


def test_decode_ahead_may_carry_an_offload():
    """An allocation planned ahead may need a parked session's blocks: the offload travels in that output."""
    clock = Clock()
    s = make(clock, num_blocks=12, enable_prefix_caching=False)
    eng = FakeKVEngine(s, 50)
    s.open_session("p")
    s.submit_turn("p", "p1", list(range(1, 28)), StopCondition(max_tokens=4))   # parks 8 blocks
    while s.has_unfinished():
        eng.step()
    s.add_request("g", [9] * 3, StopCondition(max_tokens=40))   # 11 blocks: counts p's 8 as reclaimable
    out = s.schedule()
    s.update(out, eng.execute(out))
    out = s.schedule()
    swapped = []
    for _ in range(38):
        ahead = s.schedule_decode_ahead(out)
        assert ahead is not None
        swapped += ahead.swap_out
        s.update(out, eng.execute(out))
        s.check_integrity()
        out = ahead
    assert len(swapped) == 8 and s.get_session("p").kv.value == "host"

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
    ahead_count, fed = 0, None
    for _ in range(steps):
        ahead = s.schedule_decode_ahead(out)
        fed = eng.execute(out, fed)
        s.update(out, fed)
        s.check_integrity()
        if ahead is None:
            return ahead_count
        ahead_count += 1
        out = ahead
        if clock is not None:
            clock.t += dt
    s.update(out, eng.execute(out, fed))
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
    swapped, fed = [], None
    for _ in range(38):
        ahead = s.schedule_decode_ahead(out)
        assert ahead is not None
        swapped += ahead.swap_out
        fed = eng.execute(out, fed)
        s.update(out, fed)
        s.check_integrity()
        out = ahead
    assert len(swapped) == 8 and s.get_session("p").kv.value == "host"


def drive_ahead(s, eng, max_steps=20_000):
    """Run everything with steps planned ahead whenever the scheduler allows (as the engine does): each step's
    placeholder inputs are fed from the previous step's samples. -> finished sequences, steps planned ahead."""
    finished, ahead_steps, steps = [], 0, 0
    out, fed = s.schedule(), None
    while not out.is_empty or s.has_unfinished():
        ahead = s.schedule_decode_ahead(out) if out.scheduled else None
        sampled = eng.execute(out, fed)
        finished += s.update(out, sampled)
        s.check_integrity()
        if ahead is not None:
            out, fed = ahead, sampled
            ahead_steps += 1
        else:
            out, fed = s.schedule(), None
        steps += 1
        assert steps < max_steps
    return finished, ahead_steps


def test_steps_planned_ahead_after_prefill_chunks_match_the_reference():
    """Steps planned ahead after a prefill step (its sampled tokens fed, its unfinished chunks continued):
    random prompts longer than the token budget, sessions with late restores, small pools."""
    import random
    from tests.scheduler.fake_engine import reference_output
    rng = random.Random(21)
    ahead_total = 0
    for scenario in range(60):
        clock = Clock()
        s = make(clock, num_blocks=rng.randint(24, 64), max_num_batched_tokens=rng.randint(3, 24),
                 enable_prefix_caching=rng.random() < 0.5, plan_ahead_after_prefill=True)
        eng = FakeKVEngine(s, 50, landing_delay=rng.choice([0, 2]))
        expected = {}
        for i in range(rng.randint(1, 6)):
            prompt = [rng.randrange(50) for _ in range(rng.randint(1, 40))]
            max_tokens = rng.randint(1, 12)
            s.add_request(f"r{i}", prompt, StopCondition(max_tokens=max_tokens))
            expected[f"r{i}"] = reference_output(prompt, max_tokens, 50)
        finished, ahead = drive_ahead(s, eng)
        assert {f.request_id: f.output_token_ids for f in finished} == expected, scenario
        assert s.pool.num_in_use == 0 and s.kv.num_reserved == 0
        ahead_total += ahead
    assert ahead_total > 500, ahead_total


def test_a_chunked_prefill_continues_in_steps_planned_ahead():
    clock = Clock()
    s = make(clock, max_num_batched_tokens=8, plan_ahead_after_prefill=True)
    eng = FakeKVEngine(s, 50)
    s.add_request("long", list(range(1, 41)), StopCondition(max_tokens=3))   # 5 chunks of 8
    out = s.schedule()
    kinds = []
    fed = None
    while out is not None and out.scheduled:
        kinds.append((out.num_fed, out.scheduled[0].num_tokens, out.scheduled[0].sample))
        ahead = s.schedule_decode_ahead(out)
        sampled = eng.execute(out, fed)
        s.update(out, sampled)
        out, fed = ahead, sampled
    assert kinds == [(0, 8, False)] * 4 + [(0, 8, True), (1, 1, True), (1, 1, True)]


def test_planning_ahead_after_prefill_can_be_turned_off():
    for after_prefill in (True, False):
        s = make(Clock(), plan_ahead_after_prefill=after_prefill)
        eng = FakeKVEngine(s, 50)
        s.add_request("a", [1, 2, 3], StopCondition(max_tokens=5))
        out = s.schedule()                                # a prefill step
        ahead = s.schedule_decode_ahead(out)
        assert (ahead is not None) == after_prefill
        s.update(out, eng.execute(out))

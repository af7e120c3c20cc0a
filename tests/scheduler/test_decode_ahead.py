"""Decode steps planned ahead (scheduler.decode_ahead): when they are planned, and that per-step housekeeping
(TTL expiry) runs in a long run of them too; with ``plan_ahead_admissions``, landed restores and admissions
planned ahead as well."""
import random

from scheduler import Scheduler, SchedulerConfig, StopCondition
from tests.scheduler.fake_engine import FakeKVEngine, RandomSessions, reference_output


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


def drive_ahead(s, eng, max_steps=20_000, between=None):
    """Run everything with steps planned ahead whenever the scheduler allows (as the engine does): each step's
    placeholder inputs are fed from the previous step's samples; ``between()`` runs before each plan (new
    turns arrive). -> finished sequences, steps planned ahead."""
    finished, ahead_steps, steps = [], 0, 0
    out, fed = s.schedule(), None
    while True:
        more = between() if between is not None else False
        if out.is_empty and not s.has_unfinished() and not more:
            break
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


def test_admissions_and_landed_restores_join_steps_planned_ahead():
    """With plan_ahead_admissions a queued request is admitted in the step planned ahead (it runs there, after
    prev's decodes) and a sequence whose restore landed is scheduled there, instead of a full schedule."""
    clock = Clock()
    s = make(clock, plan_ahead_after_prefill=True, plan_ahead_admissions=True)
    eng = FakeKVEngine(s, 50)
    s.add_request("a", [1, 2, 3], StopCondition(max_tokens=40))
    out = s.schedule()
    s.update(out, eng.execute(out))
    out = s.schedule()
    s.add_request("b", [4, 5], StopCondition(max_tokens=4))
    ahead = s.schedule_decode_ahead(out)
    assert ahead is not None and [it.request_id for it in ahead.scheduled] == ["a", "b"] and ahead.num_fed == 1
    assert ahead.scheduled[1].token_ids == [4, 5] and not s.waiting
    s.ready_changed = True                             # as a landed restore sets it: planned ahead all the same
    fed = eng.execute(out)
    s.update(out, fed)
    nxt = s.schedule_decode_ahead(ahead)
    assert nxt is not None and not s.ready_changed


def test_randomized_sessions_with_admissions_planned_ahead_match_the_reference():
    """Sessions sharing a prefix under KV pressure (offloads, drops, restores landing 0-3 steps late), every
    step planned ahead when the scheduler allows, admissions and landed restores included: outputs equal the
    reference, integrity holds after every step, nothing is preempted."""
    rng = random.Random(23)
    ahead_total = 0
    admitted_ahead = 0

    for scenario in range(120):
        s = make(Clock(), num_blocks=rng.randint(14, 40), num_host_blocks=rng.choice([0, 6, 64]),
                 max_num_seqs=rng.randint(2, 8), max_num_batched_tokens=rng.randint(4, 40),
                 enable_prefix_caching=rng.random() < 0.7, plan_ahead_after_prefill=True,
                 plan_ahead_admissions=True)
        eng = FakeKVEngine(s, 60, landing_delay=rng.choice([0, 1, 2, 3]))
        sessions = RandomSessions(s, rng, 60, {f"s{i}": rng.randint(2, 5) for i in range(rng.randint(3, 8))},
                                  list(range(1, 17))[:rng.choice([0, 4, 8])], 0.5, (1, 8), (1, 8))
        plan = s.schedule_decode_ahead

        def counted(prev, plan=plan, s=s):
            nonlocal admitted_ahead
            before = s.stats.admissions
            out = plan(prev)
            admitted_ahead += s.stats.admissions - before
            return out
        s.schedule_decode_ahead = counted

        def between(sessions=sessions):
            sessions.submit()
            return not sessions.done
        finished, ahead = drive_ahead(s, eng, between=between)
        sessions.check(finished, scenario)
        assert not sessions.expected, scenario
        assert s.stats.preemptions == 0 and s.stats.recomputed_tokens == 0
        ahead_total += ahead
    assert ahead_total > 2000 and admitted_ahead > 200, (ahead_total, admitted_ahead)

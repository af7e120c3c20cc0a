"""Offload and restore with copies that land late (scheduler.kv_offload): a restored sequence runs only after
its copy landed, blocks a copy may still write are never reused, and the copy-ordering contract (reads
before writes) lets a freed block or host block be reused within one output."""
import random

from scheduler import KVLocation, Scheduler, SchedulerConfig, StopCondition
from tests.scheduler.fake_engine import FakeKVEngine, reference_output, run_turn as turn

VOCAB = 60


def make(**kw):
    cfg = dict(num_blocks=12, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256,
               num_host_blocks=32, enable_prefix_caching=False)
    cfg.update(kw)
    return Scheduler(SchedulerConfig(**cfg), clock=lambda: 0.0)


def test_restore_runs_only_after_its_copy_lands():
    s = make()
    eng = FakeKVEngine(s, VOCAB, landing_delay=3)
    s.open_session("a")
    s.open_session("b")
    turn(s, eng, "a", "a1", list(range(1, 28)), 4)          # a parks 8 blocks
    turn(s, eng, "b", "b1", list(range(30, 50)), 8)         # b needs 7: a goes to the host
    assert s.get_session("a").kv is KVLocation.HOST
    s.close_session("b")
    s.submit_turn("a", "a2", [5, 5, 5], StopCondition(max_tokens=3))
    out = s.schedule()
    assert len(out.swap_in) == 8 and out.restores == [s.get_session("a").seq_id] and not out.scheduled
    s.update(out, eng.execute(out))
    for i in range(3):                                      # in flight: nothing to run, the fake asserts reads
        out, _ = eng.step()
        assert not out.scheduled and s.get_session("a").kv_ready == (i == 2)   # lands at the end of the 3rd
    out, _ = eng.step()                                     # runs now
    assert [it.request_id for it in out.scheduled] == ["a2"]
    fin = eng.run()
    context = s.get_session("a").token_ids[:-3]
    assert fin[0].output_token_ids == reference_output(context, 3, VOCAB) and fin[0].num_prefill_tokens == 3


def test_a_restore_that_ends_before_landing_holds_its_blocks_until_then():
    s = make()
    eng = FakeKVEngine(s, VOCAB, landing_delay=3)
    s.open_session("a")
    s.open_session("b")
    turn(s, eng, "a", "a1", list(range(1, 28)), 4)
    turn(s, eng, "b", "b1", list(range(30, 50)), 8)
    s.close_session("b")
    s.submit_turn("a", "a2", [5, 5, 5], StopCondition(max_tokens=3))
    out = s.schedule()
    s.update(out, eng.execute(out))
    restoring = {d for _, d in out.swap_in}
    s.close_session("a")                                    # before the copy landed
    assert s.offload.num_landing == 1 and restoring <= set(s.offload.held_blocks())
    s.check_integrity()
    s.open_session("c")                                     # a new turn wants the whole pool
    s.submit_turn("c", "c1", list(range(1, 40)), StopCondition(max_tokens=4))
    out, _ = eng.step()
    assert not (restoring & {b for it in out.scheduled for b in it.block_ids})
    fin = eng.run()
    assert fin[0].output_token_ids == reference_output(list(range(1, 40)), 4, VOCAB)
    assert s.offload.num_landing == 0
    s.close_session("c")
    s.check_integrity()
    assert s.pool.num_in_use == 0


def test_an_aborted_turn_whose_restore_is_in_flight_parks_once_it_lands():
    s = make()
    eng = FakeKVEngine(s, VOCAB, landing_delay=2)
    s.open_session("a")
    s.open_session("b")
    turn(s, eng, "a", "a1", list(range(1, 28)), 4)
    turn(s, eng, "b", "b1", list(range(30, 50)), 8)
    s.close_session("b")
    s.submit_turn("a", "a2", [5], StopCondition(max_tokens=3))
    out = s.schedule()
    s.update(out, eng.execute(out))
    s.abort("a2")                                           # the session stays open, its KV keeps coming back
    s.check_integrity()
    assert s.pool.num_reclaimable == 0                      # not reclaimable while a copy may write it
    while s.offload.num_landing:
        eng.step()
    assert s.pool.num_reclaimable == 8
    f = turn(s, eng, "a", "a3", [6, 6], 2)
    assert f.num_prefill_tokens == 1 + 2 and s.stats.restored_sessions == 1   # the aborted turn's token + 2


def test_freed_blocks_reused_within_one_output_follow_the_copy_contract():
    """One output both offloads a session and restores another into the blocks it freed (device side), and
    reuses a host block a restore just freed (host side): the fake engine reads before it writes, as the
    engine must; outputs stay exact."""
    s = make(num_blocks=9, num_host_blocks=9)
    eng = FakeKVEngine(s, VOCAB)
    reused_device = reused_host = False
    s.open_session("a")
    s.open_session("b")
    turn(s, eng, "a", "a1", list(range(1, 27)), 3)          # 28 tokens computed: 7 blocks
    turn(s, eng, "b", "b1", list(range(30, 56)), 3)         # b needs 7: a -> host
    for k in range(4):                                      # alternate: each turn offloads the other session
        sid = "a" if k % 2 == 0 else "b"
        s.submit_turn(sid, f"{sid}{k + 2}", [], StopCondition(max_tokens=1))
        while True:
            out, fin = eng.step()
            outs = {d for d, _ in out.swap_out}
            reused_device |= bool(outs & {d for _, d in out.swap_in})
            reused_host |= bool({h for h, _ in out.swap_in} & {h for _, h in out.swap_out})
            if fin:
                break
    assert reused_device and reused_host
    assert s.stats.preemptions == 0 and s.stats.dropped_sessions == 0
    for sid in ("a", "b"):
        tokens = s.get_session(sid).token_ids
        assert tokens[29:] == reference_output(tokens[:29], len(tokens) - 29, VOCAB)   # 26 + 3, then 1 a turn


def test_randomized_sessions_with_late_landing_copies():
    rng = random.Random(5)
    for scenario in range(100):
        s = make(num_blocks=rng.randint(10, 24), num_host_blocks=rng.choice([8, 64]),
                 max_num_batched_tokens=rng.randint(4, 32), enable_prefix_caching=rng.random() < 0.5)
        eng = FakeKVEngine(s, VOCAB, landing_delay=rng.randint(1, 4))
        sids = [f"s{i}" for i in range(rng.randint(2, 5))]
        expected = {}
        turns = dict.fromkeys(sids, 0)
        for sid in sids:
            s.open_session(sid)
        for _ in range(300):
            for sid in sids:
                sess = s.get_session(sid)
                if sess.status.value == "awaiting_input" and turns[sid] < 3 and rng.random() < 0.5:
                    new = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 10))]
                    rid = f"{sid}-{turns[sid]}"
                    try:
                        s.submit_turn(sid, rid, new, StopCondition(max_tokens=rng.randint(1, 6)))
                    except ValueError:
                        turns[sid] = 3
                        continue
                    expected[rid] = reference_output(sess.token_ids, sess.stop.max_tokens, VOCAB)
                    turns[sid] += 1
                elif rng.random() < 0.02 and sess.status.value in ("waiting", "running"):
                    s.abort(sess.request_id)                  # aborts land anywhere, restores in flight too
                    expected.pop(sess.request_id)
            _, fin = eng.step(check=True)
            for f in fin:
                if f.finish_reason != "aborted":
                    assert f.output_token_ids == expected.pop(f.request_id), (scenario, f.request_id)
            if not s.has_unfinished() and all(t == 3 for t in turns.values()):
                break
        for sid in sids:
            s.close_session(sid)
        while s.offload.num_landing:
            eng.step(check=True)
        s.check_integrity()
        assert s.pool.num_in_use == 0 and s.kv.num_reserved == 0 and s.stats.preemptions == 0

"""RolloutPool on local Ray (2 CPUs) with two CPU workers on a tiny model: sessions through the pool equal a
single engine and every later turn ran where its KV lives; GRPO n; completion-order refs; weight updates with
one barrier (and a partial failure); a worker killed mid-rollout fails what it held and comes back on the
current weights. Tests run in file order and share one pool (the fault test is last)."""
import asyncio
import time

import pytest

ray = pytest.importorskip("ray")

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from rollout.backend import ErrorCode, RolloutBackend, RolloutError  # noqa: E402
from rollout.trajectory import ENV_VERSION  # noqa: E402
from tests.rollout.pool_helpers import local_pool, tiny_model_pair  # noqa: E402

GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)


def config(path):
    return EngineConfig(model=str(path), num_kv_blocks=1024, block_size=8, max_model_len=128)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_model_pair(tmp_path_factory.mktemp("pool"))


@pytest.fixture(scope="module")
def pool(models):
    with local_pool(config(models[0])) as pool:
        yield pool


@pytest.fixture(scope="module")
def oracle_a(models):
    return LLMEngine(config(models[0]))


@pytest.fixture(scope="module")
def oracle_b(models):
    return LLMEngine(config(models[1]))


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def observations(i):
    return [[(7 * i + j) % 400 + 2 for j in range(3 + i % 6)], [i % 300 + 2], [(3 * i) % 300 + 2, 5]]


def oracle_sessions(engine, n):
    """Every session's turns on one engine, all sessions batched per turn."""
    sids = [engine.open_session() for _ in range(n)]
    turns = [[] for _ in range(n)]
    for k in range(3):
        rids = {engine.submit_turn(sid, observations(i)[k], GREEDY): i for i, sid in enumerate(sids)}
        while rids:
            for c in engine.step():
                turns[rids.pop(c.request_id)].append(c)
    wholes = [engine.session_tokens(sid) for sid in sids]
    for sid in sids:
        engine.close_session(sid)
    return turns, wholes


def worker_counters(stats):
    return {w["worker"]: (w["resumed_turns"], w["resident_turns"], w["sessions_opened"]) for w in stats["workers"]}


def test_200_sessions_x3_equal_single_engine_and_stay_on_their_worker(pool, oracle_a):
    assert isinstance(pool, RolloutBackend)
    n = 200
    before = worker_counters(run(pool.stats()))

    async def session(i):
        sid = await pool.open_session()
        turns = [await pool.step_session(sid, obs, GREEDY) for obs in observations(i)]
        return turns, await pool.close_session(sid)

    async def all_sessions():
        return await asyncio.gather(*(session(i) for i in range(n)))

    t0 = time.monotonic()
    results = run(all_sessions())
    elapsed = time.monotonic() - t0
    expected_turns, expected_wholes = oracle_sessions(oracle_a, n)
    for i, (turns, whole) in enumerate(results):
        workers = {t.metrics["worker"] for t in turns} | {whole.metrics["worker"]}
        assert len(workers) == 1, f"session {i} moved between workers"
        for k, (turn, c) in enumerate(zip(turns, expected_turns[i])):
            assert turn.token_ids == c.token_ids, (i, k)
            assert turn.logprobs == pytest.approx(c.logprobs, abs=1e-4)
            assert turn.metrics["kv_resident"] is (k > 0)
        assert whole.prompt_ids + whole.token_ids == expected_wholes[i]
        obs = observations(i)
        assert whole.loss_mask == [1] * 4 + [0] * len(obs[1]) + [1] * 4 + [0] * len(obs[2]) + [1] * 4
        assert len(whole.logprobs) == len(whole.versions) == len(whole.token_ids)
        assert all((v == 0) == bool(m) and (v == ENV_VERSION) != bool(m) for v, m in zip(whole.versions, whole.loss_mask))
        assert whole.turns == 3
    after = worker_counters(run(pool.stats()))
    opened = {w: after[w][2] - before[w][2] for w in after}
    assert sum(opened.values()) == n and min(opened.values()) >= n // 4, opened   # both workers took sessions
    for w in after:
        resumed, resident = after[w][0] - before[w][0], after[w][1] - before[w][1]
        assert resumed == resident == 2 * opened[w], (w, resumed, resident, opened)
    print(f"200 sessions x 3 turns through the pool: {elapsed:.2f} s")


def test_200_sessions_x3_through_zeromq_equal_single_engine(pool, oracle_a):
    """The same workload through the ZeroMQ front end (over this pool) and the asyncio client."""
    from rollout.client import AsyncRolloutClient
    from rollout.server import BackgroundFrontEnd

    n = 200
    before = worker_counters(run(pool.stats()))
    with BackgroundFrontEnd(lambda: pool, "tcp://127.0.0.1:*") as fe:
        async def all_sessions():
            async with AsyncRolloutClient(fe.address, timeout_s=120) as client:
                async def session(i):
                    sid = await client.open_session()
                    turns = [await client.step_session(sid, obs, GREEDY) for obs in observations(i)]
                    return turns, await client.close_session(sid)
                return await asyncio.gather(*(session(i) for i in range(n)))
        results = run(all_sessions(), timeout=240)
    expected_turns, expected_wholes = oracle_sessions(oracle_a, n)
    for i, (turns, whole) in enumerate(results):
        assert [t.token_ids for t in turns] == [c.token_ids for c in expected_turns[i]], i
        assert whole.prompt_ids + whole.token_ids == expected_wholes[i]
        assert len(whole.logprobs) == len(whole.versions) == len(whole.loss_mask) == len(whole.token_ids)
        assert sum(whole.loss_mask) == 12 and whole.turns == 3
    after = worker_counters(run(pool.stats()))
    for w in after:
        opened = after[w][2] - before[w][2]
        assert after[w][0] - before[w][0] == after[w][1] - before[w][1] == 2 * opened


def test_cancelled_request_is_aborted_on_its_worker(pool):
    """Cancelling a pool call (front-end abort, timeout, client cancel) aborts the request in the worker's
    engine instead of leaving it generating to max_tokens."""
    def totals(stats):
        return sum(w["aborted_requests"] for w in stats["workers"]), sum(w["num_running"] for w in stats["workers"])

    async def scenario():
        aborted_before, _ = totals(await pool.stats())
        task = asyncio.ensure_future(pool.generate([5, 6, 7], SamplingParams(max_tokens=120, ignore_eos=True)))
        deadline = time.monotonic() + 30
        while totals(await pool.stats())[1] == 0:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.01)
        task.cancel()
        while True:
            aborted, running = totals(await pool.stats())
            if aborted > aborted_before and running == 0:
                return
            assert time.monotonic() < deadline, "the cancelled request kept running on its worker"
            await asyncio.sleep(0.05)
    run(scenario())


def test_timed_out_episode_frees_its_session_on_the_worker(pool):
    """A caller's timeout on run_episode (asyncio cancellation through the pool and Ray) closes the episode's
    session on its worker at once, while its environment is still in a tool call — not at the session's TTL."""
    delay = 4.0

    def open_sessions(stats):
        return sum(w["open_sessions"] for w in stats["workers"])

    def in_tool_call(stats):   # the session is open and its turn is over: the environment's step is sleeping
        return open_sessions(stats) > 0 and all(w["num_running"] == w["num_waiting"] == 0 for w in stats["workers"])

    async def scenario():
        assert open_sessions(await pool.stats()) == 0
        # an instant reset (it used to sleep 4 s too, only waiting), then a first turn, then a 4 s step
        episode = asyncio.ensure_future(pool.run_episode(
            "slow_test", {"delay_s": delay, "reset_delay_s": 0.0, "num_steps": 2}, GREEDY, 3))
        deadline = time.monotonic() + 3 * delay + 30
        while not in_tool_call(await pool.stats()):
            assert time.monotonic() < deadline and not episode.done()
            await asyncio.sleep(0.02)
        episode.cancel()                                    # what asyncio.wait_for does when it times out
        cancelled_at = time.monotonic()
        while open_sessions(await pool.stats()) != 0:
            assert time.monotonic() - cancelled_at < delay - 1.0, "the session outlived its cancelled episode"
            await asyncio.sleep(0.05)
        with pytest.raises(asyncio.CancelledError):
            await episode
    run(scenario())


def test_grpo_n_and_completion_order(pool, oracle_a):
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=5)
    group = run(pool.generate([3, 4, 5, 6], params))
    expected = oracle_a.generate([[3, 4, 5, 6]], params)
    assert [t.sample_index for t in group] == [0, 1, 2, 3]
    assert [t.token_ids for t in group] == [c.token_ids for c in expected]
    assert len({t.metrics["worker"] for t in group}) == 1       # a group shares its prompt's KV on one worker
    prompts = [observations(i)[0] for i in range(8)]
    refs = pool.generate_refs(prompts, GREEDY)
    seen = {}
    for index, trajs in pool.as_completed(refs, timeout_s=60):
        seen[index] = trajs
    assert sorted(seen) == list(range(8))
    assert {seen[i][0].metrics["worker"] for i in seen} == {0, 1}
    for i, c in enumerate(oracle_a.generate(prompts, GREEDY)):
        assert seen[i][0].token_ids == c.token_ids
    batch = run(pool.generate_batch(prompts[:3], GREEDY))
    assert [b[0].token_ids for b in batch] == [seen[i][0].token_ids for i in range(3)]


def test_run_episodes_refs_start_each_episode_once(pool):
    """Each worker's share goes in one start_episodes call, then one collecting call per episode (its ref):
    every episode runs once, over both workers, and equals the same episode run alone."""
    kwargs = [{"seed": i, "prompt_len": 4 + i, "obs_len": 2, "num_steps": 2} for i in range(6)]

    def episodes_run():
        return sum(w["episodes"] for w in run(pool.stats())["workers"])
    before = episodes_run()
    got = dict(pool.as_completed(pool.run_episodes_refs("echo_test", kwargs, GREEDY, 3), timeout_s=60))
    assert sorted(got) == list(range(6)) and episodes_run() == before + 6
    assert {t.metrics["worker"] for t in got.values()} == {0, 1}
    for i in (0, 5):
        alone = run(pool.run_episode("echo_test", kwargs[i], GREEDY, 3))
        assert (alone.prompt_ids, alone.token_ids, alone.loss_mask, alone.turns) == \
            (got[i].prompt_ids, got[i].token_ids, got[i].loss_mask, got[i].turns) and alone.turns == 2


def test_sleep_and_wake_every_worker(pool, oracle_a):
    """pool.sleep(1) releases every worker's KV cache; work sent meanwhile waits on its worker (its engine
    runs nothing while asleep) and completes after wake_up, equal to a single engine."""
    reports = run(pool.sleep(1))
    assert sorted(r["worker"] for r in reports) == [0, 1]
    assert all(r["level"] == 1 and r["kv_bytes"] > 0 and r["freed_bytes"] >= r["kv_bytes"] for r in reports)
    prompts = [observations(i)[0] for i in range(4)]
    refs = pool.generate_refs(prompts, GREEDY)
    ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
    assert ready == []                          # asleep: nothing runs (not a race: the engine takes no step)
    woken = run(pool.wake_up())
    assert sorted(r["worker"] for r in woken) == [0, 1] and all(r["level"] == 1 for r in woken)
    trajs = ray.get(refs, timeout=60)
    assert [t[0].token_ids for t in trajs] == [c.token_ids for c in oracle_a.generate(prompts, GREEDY)]
    with pytest.raises(RolloutError) as err:
        run(pool.wake_up())                     # not asleep
    assert err.value.code is ErrorCode.BAD_REQUEST


def versions_by_worker(pool, prompts, oracle):
    """Generate on both workers; check tokens against ``oracle``; -> {worker: set of versions}."""
    out = {}
    trajs = ray.get(pool.generate_refs(prompts, GREEDY), timeout=60)
    for (traj,), c in zip(trajs, oracle.generate(prompts, GREEDY)):
        assert traj.token_ids == c.token_ids
        out.setdefault(traj.metrics["worker"], set()).update(traj.versions)
    return out


def test_update_weights_one_barrier_and_partial_failure(pool, models, oracle_a, oracle_b):
    from safetensors.torch import load_file

    from rollout.worker import WeightSource
    prompts = [observations(i)[0] for i in range(6)]
    report = run(pool.update_weights("safetensors", {"path": str(models[1])}))
    assert report["version"] == 1 and report["num_workers"] == 2
    assert {w["version"] for w in run(pool.health())["workers"]} == {1}
    assert versions_by_worker(pool, prompts, oracle_b) == {0: {1}, 1: {1}}

    state_a = load_file(str(models[0] / "model.safetensors"))
    assert run(pool.update_weights_from_state_dict(state_a, version=2))["version"] == 2
    assert versions_by_worker(pool, prompts, oracle_a) == {0: {2}, 1: {2}}

    # Every worker rejects: the old weights keep serving, the pool stays consistent.
    with pytest.raises(RolloutError) as info:
        run(pool.update_weights("safetensors", {"path": "/nonexistent/ckpt"}))
    assert info.value.code is ErrorCode.UPDATE_FAILED and pool.version == 2
    assert run(pool.health())["ok"]

    # Partial: worker 0 is moved to version 5 behind the pool's back, so version 3 fails there only.
    handle = pool._slots[0].actor.handle
    ray.get(handle.update_weights.remote(WeightSource(5, "safetensors", {"path": str(models[1])})), timeout=60)
    with pytest.raises(RolloutError) as info:
        run(pool.update_weights("safetensors", {"path": str(models[1])}, version=3))
    assert info.value.code is ErrorCode.UPDATE_FAILED and "1 of 2" in info.value.message
    with pytest.raises(RolloutError) as info:
        run(pool.generate([3, 4], GREEDY))
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert not run(pool.health())["ok"]
    # A complete update brings the pool back (in-memory weights: the restart test reloads these refs).
    state_b = load_file(str(models[1] / "model.safetensors"))
    assert run(pool.update_weights_from_state_dict(state_b, version=6))["version"] == 6
    assert run(pool.health())["ok"]
    assert versions_by_worker(pool, prompts, oracle_b) == {0: {6}, 1: {6}}


def test_killed_worker_fails_its_requests_and_restarts_on_current_weights(pool, oracle_b):
    assert pool.version == 6     # weights of model b, from object refs (previous test)
    slow = {"delay_s": 2.0, "num_steps": 2}

    async def scenario():
        sids = [await pool.open_session() for _ in range(2)]
        homes = {sid: (await pool.step_session(sid, [3, 4, 5], GREEDY)).metrics["worker"] for sid in sids}
        assert set(homes.values()) == {0, 1}
        episodes = [asyncio.ensure_future(pool.run_episode("slow_test", slow, GREEDY, 3)) for _ in range(4)]
        await asyncio.sleep(1.0)                        # every episode is in its environment's sleep
        victim = pool._slots[0].actor.handle
        killed_at = time.monotonic()
        ray.kill(victim, no_restart=True)
        finished_at = {}
        for ep in episodes:
            ep.add_done_callback(lambda f: finished_at.setdefault(f, time.monotonic()))
        outcomes = await asyncio.gather(*episodes, return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert failed and all(isinstance(e, RolloutError) and e.code is ErrorCode.WORKER_DIED for e in failed)
        assert len(failed) < len(outcomes)              # worker 1's episodes finished
        assert all(o.metrics["worker"] == 1 for o in outcomes if not isinstance(o, BaseException))
        fail_latency = max(finished_at[ep] for ep, o in zip(episodes, outcomes) if isinstance(o, BaseException)) \
            - killed_at
        assert fail_latency < 4.0, fail_latency        # before the slow environment would have finished
        lost = next(sid for sid, w in homes.items() if w == 0)
        kept = next(sid for sid, w in homes.items() if w == 1)
        with pytest.raises(RolloutError) as info:
            await pool.step_session(lost, [6], GREEDY)
        assert info.value.code is ErrorCode.UNKNOWN_SESSION
        assert (await pool.step_session(kept, [6], GREEDY)).metrics["worker"] == 1
        await pool.close_session(kept)
        deadline = time.monotonic() + 90
        while not (await pool.health())["ok"]:
            assert time.monotonic() < deadline, "worker 0 did not come back"
            await asyncio.sleep(0.5)
        return fail_latency

    fail_latency = run(scenario(), timeout=150)
    health = run(pool.health())
    assert [w["version"] for w in health["workers"]] == [6, 6]
    assert health["workers"][0]["restarts"] == 1
    prompts = [observations(i)[0] for i in range(6)]
    assert versions_by_worker(pool, prompts, oracle_b) == {0: {6}, 1: {6}}   # restarted worker: current weights
    stats = run(pool.stats())
    assert stats["worker_deaths"] == 1 and stats["workers"][0]["restarts"] == 1
    print(f"requests on the killed worker failed {fail_latency:.2f} s after the kill")


def test_weight_pusher_sends_a_trainers_parameters_to_every_worker(pool, models, oracle_a):
    """A trainer's model (Hugging Face, tied names once) through WeightPusher: on CPU the object store; every
    worker's greedy tokens equal a fresh engine on those weights, at the pushed version. CUDA IPC needs a GPU
    shared with the workers: asking for it here is refused with the reason, and the pool is untouched."""
    import torch
    from transformers import AutoModelForCausalLM

    from rollout.weight_push import WeightPusher
    trainer = AutoModelForCausalLM.from_pretrained(models[0], dtype=torch.float32)
    with pytest.raises(ValueError, match="cuda_ipc.*trainer's weights are on cpu"):
        WeightPusher(pool, transport="cuda_ipc")
    with pytest.raises(ValueError, match="transport must be one of"):
        WeightPusher(pool, transport="nccl")
    assert pool.version == 6
    pusher = WeightPusher(pool)
    assert pusher.transport == "object_store"
    report = pusher.push(trainer.named_parameters(), version=7)
    assert report.version == 7 and report.num_workers == 2 and report.transport == "object_store"
    assert report.bytes == sum(p.numel() * p.element_size() for p in trainer.parameters())
    # the split of the push's time: every stage stamped (one clock for both processes), none negative, the
    # stages adding up to the caller's wait
    assert set(report.stages) == {"pack", "to_worker", "to_engine_thread", "loader", "apply", "return", "pool"}
    assert all(v >= 0 for v in report.stages.values()), report.stages
    assert sum(report.stages.values()) == pytest.approx(report.seconds, rel=1e-6)
    prompts = [observations(i)[0] for i in range(6)]
    assert versions_by_worker(pool, prompts, oracle_a) == {0: {7}, 1: {7}}
    from weight_sync.digest import digest_of
    fresh = digest_of(oracle_a.model.named_parameters())
    assert [(d["digest"], d["version"]) for d in run(pool.weights_digests())] == [(fresh, 7)] * 2
    with pytest.raises(RolloutError) as info:      # a version that does not move forward: refused, nothing applied
        pusher.push(trainer.named_parameters(), version=7)
    assert info.value.code is ErrorCode.BAD_REQUEST and pool.version == 7


def test_num_gpus_per_worker_is_checked_before_anything_starts():
    from rollout.pool import RolloutPool
    cpu = EngineConfig(model="unused")
    with pytest.raises(ValueError, match="needs a CUDA engine"):
        RolloutPool(cpu, 1, num_gpus_per_worker=0.5)
    for bad in (0, 1.5, -0.5):
        with pytest.raises(ValueError, match=r"num_gpus_per_worker must be in \(0, 1\]"):
            RolloutPool(EngineConfig(model="unused", device="cuda"), 1, num_gpus_per_worker=bad)
    with pytest.raises(ValueError, match="must be a number"):
        RolloutPool(EngineConfig(model="unused", device="cuda"), 1, num_gpus_per_worker="half")

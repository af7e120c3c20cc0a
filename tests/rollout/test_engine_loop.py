"""EngineLoop and LocalBackend on a tiny model: concurrent callers get exactly what a plain LLMEngine gives,
engine errors map to codes, the agent loop's trajectory lines up, and a slow environment never stalls the
engine thread."""
import asyncio
import threading
import time

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.tiny_models import make_tiny_model
from rollout.backend import ErrorCode, RolloutBackend, RolloutError
from rollout.engine_loop import EngineLoop
from rollout.envs.testing import EchoTestEnvironment
from rollout.local import LocalBackend
from rollout.trajectory import ENV_VERSION
from weight_sync import StateDictLoader

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    return make_tiny_model("qwen2", root / "a", seed=3), make_tiny_model("qwen2", root / "b", seed=4)


def config(path, **kw):
    return EngineConfig(model=str(path), **{"num_kv_blocks": 256, "block_size": 8, "max_model_len": 128, **kw})


@pytest.fixture(scope="module")
def loop(models):
    loop = EngineLoop(config(models[0]))
    yield loop
    loop.shutdown()


@pytest.fixture(scope="module")
def oracle(models):
    return LLMEngine(config(models[0]))


def code_of(fut, timeout=10):
    with pytest.raises(RolloutError) as info:
        fut.result(timeout)
    return info.value.code


def prompt(i):
    return [(7 * i + j) % 400 + 2 for j in range(5 + i % 4)]


def test_concurrent_generate_and_sessions_equal_plain_engine(loop, oracle):
    results, errors = {}, []

    def caller(t):
        try:
            gens = [loop.generate(prompt(10 * t + k), GREEDY) for k in range(5)]
            sid = loop.open_session().result(10)
            turns = [loop.step_session(sid, obs, GREEDY).result(10) for obs in ([5 + t, 6, 7], [8], [9, 10 + t])]
            results[t] = ([g.result(10)[0] for g in gens], turns, loop.close_session(sid).result(10))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    for t, (gens, turns, whole) in results.items():
        for k, traj in enumerate(gens):
            expected = oracle.generate([prompt(10 * t + k)], GREEDY)[0]
            assert traj.prompt_ids == prompt(10 * t + k) and traj.token_ids == expected.token_ids
            assert traj.logprobs == pytest.approx(expected.logprobs, abs=1e-4)
            assert traj.loss_mask == [1] * 6 and traj.versions == [0] * 6 and traj.turns == 1
        sid = oracle.open_session()
        observations = ([5 + t, 6, 7], [8], [9, 10 + t])
        for k, (obs, turn) in enumerate(zip(observations, turns)):
            c = oracle.run_turn(sid, obs, GREEDY)
            assert turn.prompt_ids == obs and turn.token_ids == c.token_ids and turn.turns == k + 1
            assert turn.metrics["kv_resident"] is (k > 0)
        assert whole.prompt_ids == observations[0]
        assert whole.prompt_ids + whole.token_ids == oracle.session_tokens(sid)
        assert whole.loss_mask == [1] * 6 + [0] + [1] * 6 + [0, 0] + [1] * 6
        assert [v for v, m in zip(whole.versions, whole.loss_mask) if not m] == [ENV_VERSION] * 3
        assert whole.turns == 3
        oracle.close_session(sid)
    stats = loop.stats().result(10)
    assert stats["resumed_turns"] == stats["resident_turns"] >= 8 and stats["preemptions"] == 0


def test_errors_map_to_codes(loop):
    assert code_of(loop.step_session("nope", [1], GREEDY)) is ErrorCode.UNKNOWN_SESSION
    assert code_of(loop.generate([1, 999], GREEDY)) is ErrorCode.BAD_REQUEST       # outside the vocabulary
    assert code_of(loop.generate("abc", GREEDY)) is ErrorCode.BAD_REQUEST
    assert code_of(loop.generate(list(range(2, 140)), GREEDY)) is ErrorCode.TOO_LARGE
    sid = loop.open_session().result(10)
    assert code_of(loop.open_session(sid)) is ErrorCode.BAD_REQUEST                 # already open
    long = SamplingParams(max_tokens=60, ignore_eos=True)
    first = loop.step_session(sid, [3, 4, 5], long)
    assert code_of(loop.step_session(sid, [6], GREEDY)) is ErrorCode.SESSION_BUSY
    first.result(10)
    loop.close_session(sid).result(10)
    assert code_of(loop.close_session(sid)) is ErrorCode.UNKNOWN_SESSION             # closed
    bad = {"model.embed_tokens.weight": torch.zeros(3, 3)}   # wrong shape: rejected before any write
    assert code_of(loop.update_weights(lambda: StateDictLoader(bad))) is ErrorCode.UPDATE_FAILED
    assert code_of(loop.run_episode("no_such_env", {}, GREEDY, 2)) is ErrorCode.BAD_REQUEST
    assert code_of(loop.run_episode("echo_test", {"prompt_len": 0}, GREEDY, 2)) is ErrorCode.BAD_REQUEST
    assert code_of(loop.run_episode("echo_test", {}, GREEDY, 0)) is ErrorCode.BAD_REQUEST
    assert loop.stats().result(10)["weight_version"] == 0


def test_step_failure_fails_pending_with_internal_and_loop_survives(models):
    loop = EngineLoop(config(models[0]))
    try:
        real_step = loop.engine.step
        calls = {"n": 0}

        def flaky_step():
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
            return real_step()

        loop.engine.step = flaky_step   # set while the loop is idle, before any work
        assert code_of(loop.generate([3, 4, 5], SamplingParams(max_tokens=20, ignore_eos=True))) is ErrorCode.INTERNAL
        assert len(loop.generate([3, 4, 5], GREEDY).result(10)[0].token_ids) == 6
        loop.engine.check_integrity()
        # shutdown fails what is pending with UNAVAILABLE, and later calls too
        pending = loop.generate([3, 4, 5], SamplingParams(max_tokens=100, ignore_eos=True))
        loop.shutdown()
        if not pending.done() or pending.exception() is not None:
            assert code_of(pending) is ErrorCode.UNAVAILABLE
        assert code_of(loop.generate([3], GREEDY)) is ErrorCode.UNAVAILABLE
    finally:
        loop.shutdown()


def test_cancelled_future_aborts_its_request(loop):
    before = loop.stats().result(10)["aborted_requests"]
    fut = loop.generate([3, 4, 5], SamplingParams(max_tokens=120, ignore_eos=True))
    deadline = time.monotonic() + 10
    while loop.stats().result(10)["num_running"] == 0:          # cancel it while it runs, not while queued
        assert time.monotonic() < deadline and not fut.done()
        time.sleep(0.002)
    assert fut.cancel()
    while loop.stats().result(10)["aborted_requests"] == before:
        assert time.monotonic() < deadline, "cancelling a running request must abort it in the engine"
        time.sleep(0.01)
    assert loop.stats().result(10)["num_running"] == 0


def test_failed_update_in_abort_mode_still_answers_in_flight_requests(loop, models):
    """abort mode ends in-flight work before applying; if the update then fails, those requests must still
    get their (aborted) answer instead of waiting forever."""
    running = loop.generate([3, 4, 5], SamplingParams(max_tokens=120, ignore_eos=True))

    def broken_loader():
        raise RuntimeError("trainer went away")

    def bad_manifest():   # rejected inside LLMEngine.update_weights, after abort mode ended the request
        return StateDictLoader({"not.a.weight": torch.zeros(2)})

    deadline = time.monotonic() + 10
    while loop.stats().result(10)["num_running"] == 0:
        assert time.monotonic() < deadline and not running.done()
        time.sleep(0.002)
    assert code_of(loop.update_weights(bad_manifest, mode="abort")) is ErrorCode.UPDATE_FAILED
    trajs = running.result(10)                                   # answered, not hanging
    assert trajs[0].finish_reason == "aborted" and len(trajs[0].token_ids) < 120
    assert code_of(loop.update_weights(broken_loader)) is ErrorCode.UPDATE_FAILED
    assert len(loop.generate([3, 4, 5], GREEDY).result(10)[0].token_ids) == 6
    assert loop.stats().result(10)["pending_requests"] == 0


def replay_episode(engine, kwargs, params, max_turns):
    """The agent loop by hand on a plain engine: the oracle for run_episode."""
    env = EchoTestEnvironment(**kwargs)
    sid = engine.open_session()
    obs, reward = env.reset(), 0.0
    first = obs
    for turn in range(max_turns):
        c = engine.run_turn(sid, obs, params)
        obs, r, done = env.step(c.token_ids)
        reward += r
        if done:
            break
    tokens = engine.session_tokens(sid)
    engine.close_session(sid)
    return first, tokens, reward


def test_agent_loop_trajectory_lines_up(loop, oracle):
    kwargs = {"seed": 5, "prompt_len": 7, "obs_len": 3, "num_steps": 3}
    traj = loop.run_episode("echo_test", kwargs, GREEDY, max_turns=5).result(20)
    first, tokens, reward = replay_episode(oracle, kwargs, GREEDY, 5)
    assert traj.prompt_ids == first and traj.prompt_ids + traj.token_ids == tokens
    assert traj.turns == 3 and traj.reward == pytest.approx(reward)
    assert traj.loss_mask == ([1] * 6 + [0] * 3) * 2 + [1] * 6     # the last observation is not appended
    assert all(v == ENV_VERSION and lp == 0.0 for v, lp, m in zip(traj.versions, traj.logprobs, traj.loss_mask) if not m)
    assert all(v == 0 and lp < 0 for v, lp, m in zip(traj.versions, traj.logprobs, traj.loss_mask) if m)
    # max_turns cuts it short
    short = loop.run_episode("echo_test", kwargs, GREEDY, max_turns=2).result(20)
    assert short.turns == 2 and short.loss_mask == [1] * 6 + [0] * 3 + [1] * 6


def test_slow_environment_does_not_stall_other_requests(loop):
    delay = 1.0
    start = time.monotonic()
    episode = loop.run_episode("slow_test", {"delay_s": delay, "num_steps": 2}, GREEDY, max_turns=4)
    time.sleep(0.1)
    lat = []
    for i in range(8):
        t0 = time.monotonic()
        loop.generate(prompt(i), GREEDY).result(10)
        lat.append(time.monotonic() - t0)
    assert not episode.done(), "the generate requests must finish while the environment sleeps"
    assert max(lat) < delay / 2, lat
    traj = episode.result(20)
    assert time.monotonic() - start >= 3 * delay and traj.turns == 2   # reset + 2 steps slept
    assert traj.metrics["env_seconds"] >= 3 * delay * 0.9


class GatedEnvironment(EchoTestEnvironment):
    """``step`` signals ``started`` and blocks until ``release`` (a tool call in progress, its start visible)."""

    def __init__(self, tokenizer=None, *, started: threading.Event, release: threading.Event, **kwargs) -> None:
        super().__init__(tokenizer, **kwargs)
        self.started, self.release = started, release

    def step(self, model_token_ids):
        self.started.set()
        assert self.release.wait(60), "the test never released the environment"
        return super().step(model_token_ids)


def wait_for_stats(loop, predicate, what, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        s = loop.stats().result(10)
        if predicate(s):
            return s
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s: {s}"
        time.sleep(0.005)


@pytest.mark.parametrize("cancel_during", ["env_step", "model_turn"])
def test_cancelled_episode_closes_its_session_at_once(models, cancel_during):
    """A caller that gives up on run_episode (cancel, or a timeout: the pool and the front end cancel the future)
    frees the session's KV now, not at its TTL: during a tool call, and during a model turn (which is aborted;
    the environment is never stepped again)."""
    from rollout.environment import register_environment
    register_environment("gated_test", GatedEnvironment, replace=True)
    loop = EngineLoop(config(models[0], max_model_len=2048, num_kv_blocks=512))
    started, release = threading.Event(), threading.Event()
    try:
        long_turn = SamplingParams(max_tokens=1500 if cancel_during == "model_turn" else 4, ignore_eos=True)
        fut = loop.run_episode("gated_test", {"started": started, "release": release}, long_turn, max_turns=3)
        if cancel_during == "env_step":
            assert started.wait(30), "the episode never reached its environment step"
        else:
            wait_for_stats(loop, lambda s: s["num_running"] == 1, "the episode's first turn running")
            if started.is_set():
                pytest.fail("the 1500-token turn finished before the test could cancel it")
        held = loop.stats().result(10)
        assert held["open_sessions"] == 1 and held["num_held_blocks"] > 0, held
        assert fut.cancel()
        freed = wait_for_stats(loop, lambda s: s["open_sessions"] == 0 and s["tracked_sessions"] == 0 and
                               s["num_held_blocks"] == 0, "the cancelled episode's session freed",
                               timeout_s=5.0)
        assert freed["num_running"] == 0 and freed["pending_requests"] == 0
        if cancel_during == "model_turn":
            assert freed["aborted_requests"] == held["aborted_requests"] + 1
            assert not started.is_set(), "a cancelled episode must not step its environment"
        assert loop.stats().result(10)["episodes"] == 0
    finally:
        release.set()
        loop.shutdown()


def test_local_backend(models):
    async def main():
        backend = LocalBackend(config(models[0]))
        assert isinstance(backend, RolloutBackend)
        try:
            [traj] = await backend.generate([3, 4, 5], GREEDY)
            sid = await backend.open_session()
            turn = await backend.step_session(sid, [3, 4, 5], GREEDY)
            assert turn.token_ids == traj.token_ids
            whole = await backend.close_session(sid)
            assert whole.token_ids == traj.token_ids and whole.turns == 1
            report = await backend.update_weights("safetensors", {"path": str(models[1])}, version=3)
            assert report["version"] == 3 and report["num_bytes"] > 0
            [after] = await backend.generate([3, 4, 5], GREEDY)
            fresh = LLMEngine(config(models[1])).generate([[3, 4, 5]], GREEDY)[0]
            assert after.token_ids == fresh.token_ids and after.versions == [3] * 6
            with pytest.raises(RolloutError) as info:
                await backend.update_weights("safetensors", {"path": str(models[1])}, version=2)
            assert info.value.code is ErrorCode.BAD_REQUEST     # versions only grow
            health = await backend.health()
            assert health["ok"] and health["version"] == 3
            ep = await backend.run_episode("echo_test", {"seed": 1}, GREEDY, 3)
            assert set(ep.versions) == {3, ENV_VERSION}
            assert (await backend.stats())["total"]["episodes"] == 1
        finally:
            await backend.shutdown()
        assert not (await backend.health())["ok"]
    asyncio.run(main())


def test_error_codes_come_from_exception_types_not_message_text():
    """Client-chosen ids appear in messages; they must not flip the code."""
    from rollout.loop_results import error_from_exception
    from scheduler import ContextTooLarge, SessionError
    assert error_from_exception(SessionError("session 'in progress' is unknown", "unknown")).code \
        is ErrorCode.UNKNOWN_SESSION
    assert error_from_exception(SessionError("session 'x' is unknown", "busy")).code is ErrorCode.SESSION_BUSY
    assert error_from_exception(ValueError("request_id 'KV blocks max_model_len' is already in use")).code \
        is ErrorCode.BAD_REQUEST
    assert error_from_exception(ContextTooLarge("needs 9 blocks")).code is ErrorCode.TOO_LARGE

"""Fault injection, one test per fault: every affected request ends in a clear error or a completed trajectory
(never silence, never a hang), and the service keeps serving afterwards.

- a worker process killed with SIGKILL mid-rollout (through the ZeroMQ front end over a 2-worker pool);
- a client that vanishes mid-session: the TTL frees its KV (worker stats) and the pool forgets it;
- the front end process killed and restarted on the same address while clients stay connected;
- a worker killed while idle: the pool notices before routing anything to it;
- a worker restarted after its weight source (a safetensors path) was overwritten: it refuses to replay it;
- a weight update failing half-way through the front end: old weights serve bitwise, version unchanged;
- an environment that raises, and one that hangs past env_timeout_s;
- a trainer process that dies in the middle of a distributed (gloo) weight broadcast.

Pool tests share one pool (module fixture, like tests/rollout/test_pool.py); the kill test runs last.
Loopback only; every wait is bounded.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from rollout.backend import ErrorCode, RolloutError
from rollout.client import AsyncRolloutClient, RolloutClient
from rollout.server import BackgroundFrontEnd
from tests.rollout.pool_helpers import REPO, local_pool, tiny_model_pair

BIND = "tcp://127.0.0.1:*"
GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)


def config(path, **kw):
    return EngineConfig(model=str(path), num_kv_blocks=512, block_size=8, max_model_len=256, **kw)


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_model_pair(tmp_path_factory.mktemp("faults"))


# ====================================================================== in-process engine faults
@pytest.fixture(scope="module")
def local(models):
    from rollout.local import LocalBackend
    backend = LocalBackend(config(models[0]))
    yield backend
    run(backend.shutdown())


def _params_snapshot(engine: LLMEngine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


class HalfFailingLoader:
    """Delivers the full manifest of a real checkpoint, then ``fail_after`` tensors, then raises (a trainer or
    a disk that goes away half-way)."""

    def __init__(self, path: str, fail_after: int) -> None:
        from safetensors.torch import load_file
        self.tensors = load_file(str(Path(path) / "model.safetensors"))
        self.fail_after = fail_after
        self.version = None
        self.closed = False

    def names_and_shapes(self):
        return {k: (tuple(v.shape), v.dtype) for k, v in self.tensors.items()}

    def iter_tensors(self):
        for i, item in enumerate(self.tensors.items()):
            if i == self.fail_after:
                raise ConnectionError(f"source went away after {i} tensors")
            yield item

    def close(self) -> None:
        self.closed = True


def test_weight_update_failing_half_way_keeps_old_weights_bitwise(local, models):
    from weight_sync import register_loader
    register_loader("half_failing", HalfFailingLoader, replace=True)
    engine = local.loop.engine
    prompts = [[3, 4, 5, 6, 7], [9, 8, 7], [100, 200, 300, 400]]
    with BackgroundFrontEnd(lambda: local, BIND) as fe, RolloutClient(fe.address, timeout_s=60) as c:
        before = [c.generate(p, GREEDY)[0] for p in prompts]
        snapshot = _params_snapshot(engine)
        num_tensors = len(HalfFailingLoader(str(models[1]), 0).tensors)
        with pytest.raises(RolloutError) as info:
            c.update_weights("half_failing", {"path": str(models[1]), "fail_after": num_tensors // 2})
        assert info.value.code is ErrorCode.UPDATE_FAILED
        assert "rolled back" in info.value.message and "source went away" in info.value.message
        after = _params_snapshot(engine)
        assert after.keys() == snapshot.keys()
        assert all(torch.equal(after[k], snapshot[k]) for k in snapshot)        # bitwise
        health = c.health()
        assert health["ok"] and health["version"] == 0
        again = [c.generate(p, GREEDY)[0] for p in prompts]
        assert [t.token_ids for t in again] == [t.token_ids for t in before]
        assert [t.logprobs for t in again] == [t.logprobs for t in before]     # bitwise: same floats
        assert all(set(t.versions) == {0} for t in again)
        # The engine is not stuck: a complete update lands and serves.
        assert c.update_weights("safetensors", {"path": str(models[1])})["version"] == 1
        changed = [c.generate(p, GREEDY)[0] for p in prompts]
        assert all(set(t.versions) == {1} for t in changed)
        oracle = LLMEngine(config(models[1]))
        assert [t.token_ids for t in changed] == [x.token_ids for x in oracle.generate(prompts, GREEDY)]
        engine_stats = c.stats()["backend"]["total"]
        assert engine_stats["weights_inconsistent"] is False


class RaisingEnvironment:
    """Raises in its first step: an environment bug after the episode's session is open."""

    def __init__(self, tokenizer=None) -> None:
        pass

    def reset(self, **kwargs):
        return [5, 6, 7]

    def step(self, model_token_ids):
        raise RuntimeError("tool crashed")


def test_environment_that_raises_or_hangs_ends_its_episode_with_a_clear_error(local):
    from rollout.environment import register_environment
    register_environment("raising_test", RaisingEnvironment, replace=True)
    loop = local.loop
    loop.env_timeout_s = 1.0
    try:
        with BackgroundFrontEnd(lambda: local, BIND) as fe, RolloutClient(fe.address, timeout_s=30) as c:
            t0 = time.monotonic()
            with pytest.raises(RolloutError) as info:
                c.run_episode("raising_test", {}, GREEDY, max_turns=3)
            assert info.value.code is ErrorCode.INTERNAL
            assert "raising_test" in info.value.message and "RuntimeError: tool crashed" in info.value.message
            raised_s = time.monotonic() - t0
            # Hangs in reset (3 s > env_timeout_s 1 s); a hang in step is the next test.
            t0 = time.monotonic()
            with pytest.raises(RolloutError) as info:
                c.run_episode("slow_test", {"delay_s": 3.0}, GREEDY, max_turns=3)
            timed_out_s = time.monotonic() - t0
            assert info.value.code is ErrorCode.ABORTED
            assert "reset did not return within 1.0 s" in info.value.message
            assert timed_out_s < 2.5, timed_out_s
            # The engine keeps serving meanwhile and afterwards; nothing is left held once the hung calls return.
            assert len(c.generate([1, 2, 3], GREEDY)[0].token_ids) == 4
            ep = c.run_episode("echo_test", {"num_steps": 2}, GREEDY, max_turns=3)
            assert ep.turns == 2 and ep.finish_reason == "length"
            time.sleep(3.0)                               # the hung environment calls return now
            s = c.stats()["backend"]["total"]
            assert (s["open_sessions"], s["tracked_sessions"], s["pending_requests"]) == (0, 0, 0), s
            assert s["num_free_blocks"] == s["num_total_blocks"]
            assert c.health()["ok"]
        print(f"raising environment failed its episode in {raised_s:.2f} s; hung reset in {timed_out_s:.2f} s")
    finally:
        loop.env_timeout_s = 600.0


def test_environment_step_hang_after_a_turn_closes_the_session(local):
    """env_timeout_s on a step (the session is open with KV): the episode fails and the session is freed."""
    from rollout.environment import register_environment

    class HangInStep(RaisingEnvironment):
        def step(self, model_token_ids):
            time.sleep(2.0)
            return [8], 0.0, False
    register_environment("hang_step_test", HangInStep, replace=True)
    loop = local.loop
    loop.env_timeout_s = 0.5
    try:
        fut = loop.run_episode("hang_step_test", {}, GREEDY, 3)
        t0 = time.monotonic()
        with pytest.raises(RolloutError) as info:
            fut.result(10)
        assert info.value.code is ErrorCode.ABORTED and "step did not return within 0.5 s" in info.value.message
        assert time.monotonic() - t0 < 2.0
        s = loop.stats().result(10)
        assert s["open_sessions"] == 0 and s["num_free_blocks"] == s["num_total_blocks"], s
        episodes = s["episodes"]
        time.sleep(2.0)                                   # the hung step returns: the episode does not go on
        s = loop.stats().result(10)
        assert (s["open_sessions"], s["tracked_sessions"], s["episodes"]) == (0, 0, episodes), s
    finally:
        loop.env_timeout_s = 600.0


# ====================================================================== front end process killed
def _serve_cli(model: str, address: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "rollout.cli", "serve", "--model", model, "--local",
                             "--bind", address, "--max-num-seqs", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("rollout serve: listening on "):
            return proc
    proc.kill()
    raise AssertionError("rollout serve did not start")


def test_front_end_killed_and_restarted_clients_reconnect(models):
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = _serve_cli(str(models[0]), address)
    try:
        async def scenario():
            nonlocal proc
            async with AsyncRolloutClient(address, timeout_s=30) as c:
                assert (await c.health())["ok"]
                ok_before = await c.generate([3, 4, 5], GREEDY)
                # In flight when the server dies: a slow episode (3 s in its environment) and a long generate.
                inflight = [asyncio.ensure_future(c.run_episode("slow_test", {"delay_s": 3.0}, GREEDY, 2,
                                                                timeout_s=4.0)),
                            asyncio.ensure_future(c.generate([3, 4], SamplingParams(max_tokens=900, ignore_eos=True),
                                                             timeout_s=4.0))]
                await asyncio.sleep(0.5)
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                t0 = time.monotonic()
                outcomes = await asyncio.gather(*inflight, return_exceptions=True)
                waited = time.monotonic() - t0
                # Each in-flight request ends in a client-side timeout (the server is gone), never a hang.
                assert all(isinstance(o, TimeoutError) for o in outcomes), outcomes
                assert waited < 6.0
                with pytest.raises(TimeoutError):
                    await c.health(timeout_s=0.5)          # down: no answer
                proc = _serve_cli(str(models[0]), address)  # same address: the DEALER reconnects by itself
                health = await c.health(timeout_s=30)
                assert health["ok"]
                again = await c.generate([3, 4, 5], GREEDY)
                assert again[0].token_ids == ok_before[0].token_ids   # same model, greedy: same answer
            with RolloutClient(address, timeout_s=30) as fresh:
                assert fresh.generate([3, 4, 5], GREEDY)[0].token_ids == ok_before[0].token_ids
            return waited
        waited = run(scenario(), timeout=240)
        print(f"front end SIGKILLed: in-flight requests timed out client-side after {waited:.2f} s; the same "
              f"clients were served by the restarted front end")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# ====================================================================== trainer dies mid-broadcast
def _dying_sender(port: int, path: str, buckets_to_send: int, bucket_bytes: int) -> None:
    """Trainer rank 0: the manifest and the first ``buckets_to_send`` buckets of a real update, then it dies."""
    from tests.weight_sync._sender import send_part_and_die
    from weight_sync.distributed import init_weight_sync_group
    group = init_weight_sync_group("127.0.0.1", port, 0, 2, timeout_s=20)
    send_part_and_die(group, str(Path(path) / "model.safetensors"), 1, buckets_to_send, bucket_bytes)


def test_trainer_dies_during_distributed_update(models):
    import torch.multiprocessing as mp

    from weight_sync.distributed import DistributedLoader, init_weight_sync_group
    engine = LLMEngine(config(models[0]))
    snapshot = _params_snapshot(engine)
    before = engine.generate([[3, 4, 5, 6]], GREEDY)[0]
    port = free_port()
    group_timeout_s = 5.0
    sender = mp.get_context("spawn").Process(target=_dying_sender, args=(port, str(models[1]), 2, 16 << 10))
    sender.start()
    try:
        group = init_weight_sync_group("127.0.0.1", port, 1, 2, timeout_s=group_timeout_s)
        loader = DistributedLoader(group, src=0, version=1)
        t0 = time.monotonic()
        with pytest.raises(Exception) as info:
            engine.update_weights(loader)
        failed_s = time.monotonic() - t0
        sender.join(30)
        assert sender.exitcode == 1
    finally:
        if sender.is_alive():
            sender.kill()
            sender.join(10)
    from engine.weight_update import WeightUpdateError
    assert isinstance(info.value, WeightUpdateError), repr(info.value)
    assert "rolled back" in str(info.value) and "loader raised" in str(info.value)
    # Bounded: the failing receive waits at most the group timeout, and close() does not drain a broken group.
    assert failed_s < group_timeout_s + 5, failed_s
    # The group is broken for good: a later update on it fails at once and says so (form a new group).
    assert group.broken is not None and "Connection closed" in group.broken
    t0 = time.monotonic()
    with pytest.raises(WeightUpdateError, match="is broken"):
        engine.update_weights(DistributedLoader(group, src=0, version=1))
    assert time.monotonic() - t0 < 1.0
    assert engine.weight_version == 0 and not engine.updater.inconsistent
    after = _params_snapshot(engine)
    assert all(torch.equal(after[k], snapshot[k]) for k in snapshot)
    again = engine.generate([[3, 4, 5, 6]], GREEDY)[0]
    assert again.token_ids == before.token_ids and again.logprobs == before.logprobs
    print(f"trainer died mid-broadcast: the engine's update failed after {failed_s:.2f} s: {info.value}")


# ====================================================================== pool faults (one pool, kill last)
@pytest.fixture(scope="module")
def pool(models):
    pytest.importorskip("ray")
    with local_pool(config(models[0])) as pool:
        yield pool


def _held(stats: dict) -> list:
    return [(w["worker"], w["open_sessions"], w["num_held_blocks"], w["tracked_sessions"])
            for w in stats["backend"]["workers"]]


def test_vanished_client_mid_session_is_freed_by_ttl(pool):
    with BackgroundFrontEnd(lambda: pool, BIND) as fe:
        async def scenario():
            gone = AsyncRolloutClient(fe.address, timeout_s=60)
            sids = [await gone.open_session(ttl_s=1.0) for _ in range(4)]
            for sid in sids:
                await gone.step_session(sid, list(range(2, 40)), GREEDY)   # ~6 KV blocks each, then idle
            pending = asyncio.ensure_future(gone.step_session(sids[0], [7], SamplingParams(max_tokens=50)))
            await asyncio.sleep(0.05)
            await gone.close()                   # vanishes: never closes its sessions; one turn in flight
            with pytest.raises(RolloutError):
                await pending                    # abandoned client-side ("client closed")
            async with AsyncRolloutClient(fe.address, timeout_s=60) as watcher:
                held = _held(await watcher.stats())
                assert sum(h[1] for h in held) == 4 and sum(h[2] for h in held) > 0, held
                t0 = time.monotonic()
                while True:
                    stats = await watcher.stats()
                    if all(h[1:] == (0, 0, 0) for h in _held(stats)) and stats["backend"]["sessions"] == 0:
                        break
                    assert time.monotonic() - t0 < 20, (_held(stats), stats["backend"]["sessions"])
                    await asyncio.sleep(0.25)
                freed_s = time.monotonic() - t0
                assert sum(w["expired_sessions"] for w in stats["backend"]["workers"]) >= 4
                with pytest.raises(RolloutError) as info:
                    await watcher.step_session(sids[1], [5], GREEDY)
                assert info.value.code is ErrorCode.UNKNOWN_SESSION
                return freed_s
        freed_s = run(scenario(), timeout=90)
    print(f"vanished client's sessions freed {freed_s:.2f} s after the client went away (ttl 1 s)")


def test_sigkill_worker_mid_rollout_fails_its_requests_then_serves(pool):
    ray = pytest.importorskip("ray")
    pids = {w["worker"]: w["pid"] for w in run(pool.health())["workers"]}
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    with BackgroundFrontEnd(lambda: pool, BIND) as fe:
        async def scenario():
            async with AsyncRolloutClient(fe.address, timeout_s=60) as c:
                slow = {"delay_s": 2.0, "num_steps": 2}
                episodes = [asyncio.ensure_future(c.run_episode("slow_test", slow, GREEDY, 3)) for _ in range(4)]
                gens = [asyncio.ensure_future(c.generate([i + 2, 3, 4], SamplingParams(max_tokens=200, ignore_eos=True)))
                        for i in range(6)]
                await asyncio.sleep(1.0)                # every episode is in its environment's sleep
                os.kill(pids[0], signal.SIGKILL)
                killed_at = time.monotonic()
                ended_at = {}
                for f in episodes + gens:
                    f.add_done_callback(lambda f: ended_at.setdefault(f, time.monotonic()))
                outcomes = await asyncio.gather(*episodes, *gens, return_exceptions=True)
                ended = time.monotonic() - killed_at
                fail_latency = max((ended_at[f] - killed_at for f, o in zip(episodes + gens, outcomes)
                                    if isinstance(o, BaseException)), default=0.0)
                died = [o for o in outcomes if isinstance(o, RolloutError) and o.code is ErrorCode.WORKER_DIED]
                other_errors = [o for o in outcomes if isinstance(o, BaseException) and o not in died]
                done = [o for o in outcomes if not isinstance(o, BaseException)]
                assert not other_errors, other_errors
                assert died, "nothing was running on the killed worker"
                assert len(died) + len(done) == len(outcomes)        # every request: an error or a trajectory
                for o in done:                                          # completed means complete
                    if isinstance(o, list):
                        assert len(o[0].token_ids) == 200 and o[0].finish_reason == "length"
                    else:
                        assert o.turns == 2 and o.metrics["worker"] == 1
                assert fail_latency < 4.0, fail_latency   # before the slow environment would have finished
                assert ended < 15.0, ended                              # no hang
                deadline = time.monotonic() + 90
                while not (await c.health())["ok"]:
                    assert time.monotonic() < deadline, "the killed worker did not come back"
                    await asyncio.sleep(0.5)
                new = await asyncio.gather(*(c.generate([i + 2, 5, 6], GREEDY) for i in range(8)))
                assert all(len(t[0].token_ids) == 4 for t in new)
                assert {t[0].metrics["worker"] for t in new} == {0, 1}   # the restarted worker serves too
                return len(died), len(done), fail_latency, ended
        died, done, fail_latency, ended = run(scenario(), timeout=180)
    health = run(pool.health())
    assert health["workers"][0]["restarts"] == 1 and health["workers"][0]["pid"] != pids[0]
    assert run(pool.stats())["worker_deaths"] == 1
    del ray
    print(f"SIGKILL of worker 0: {died} requests failed with worker_died {fail_latency:.2f} s after the kill, "
          f"{done} completed; all ended {ended:.2f} s after it")


def test_idle_worker_killed_is_noticed_before_it_is_routed_to(pool):
    """A worker that dies with nothing in flight looks least loaded; the pool must learn of the death by itself
    (no request has to fail first) and route the next requests to the live worker only."""
    health = run(pool.health())
    assert health["ok"], health
    pids = {w["worker"]: w["pid"] for w in health["workers"]}
    deaths = pool.worker_deaths
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    while pool.worker_deaths == deaths:   # the pool's own state: reading it calls no worker
        assert time.monotonic() - killed_at < 15.0, "the pool did not notice that an idle worker died"
        time.sleep(0.02)
    noticed_s = time.monotonic() - killed_at

    async def burst():
        return await asyncio.gather(*(pool.generate([i + 2, 7, 8], GREEDY) for i in range(8)), return_exceptions=True)
    outcomes = run(burst())
    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes   # none was sent to the dead worker
    assert all(len(o[0].token_ids) == 4 for o in outcomes)
    deadline = time.monotonic() + 90
    while not run(pool.health())["ok"]:
        assert time.monotonic() < deadline, "the killed worker did not come back"
        time.sleep(0.5)
    health = run(pool.health())
    assert health["workers"][1]["pid"] != pids[1] and pool.worker_deaths == deaths + 1
    print(f"idle worker SIGKILLed: the pool noticed {noticed_s:.2f} s later; {len(outcomes)} requests served")


def test_restarted_worker_refuses_an_overwritten_weight_source(pool, models, tmp_path):
    """update_weights from a safetensors path records the content digest the workers read. The trainer then
    overwrites that path; a worker restarted afterwards must not replay it (it would serve other weights under
    the same version): it is held out of routing, the other worker keeps serving the recorded version, the pool
    stays consistent, and the next complete update brings the held worker back."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(models[1], ckpt)
    version = pool.version + 1
    assert run(pool.update_weights("safetensors", {"path": str(ckpt)}, version=version))["num_workers"] == 2
    shutil.copy(models[0] / "model.safetensors", ckpt / "model.safetensors")      # the trainer saved again
    health = run(pool.health())
    pids, restarts = {w["worker"]: w["pid"] for w in health["workers"]}, health["workers"][0]["restarts"]
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        w0 = run(pool.health())["workers"][0]
        if w0["restarts"] == restarts + 1 or w0.get("failed"):
            break
        assert time.monotonic() < deadline, "worker 0 was not restarted"
        time.sleep(0.5)
    assert w0.get("failed") is None and w0["pid"] != pids[0]
    assert w0["alive"] is False and w0["version"] == 0, w0              # up, at its own weights, not serving
    assert f"cannot reload version {version}" in w0["awaiting_weights"], w0
    assert "no longer holds the weights" in w0["awaiting_weights"], w0
    stats = run(pool.stats())
    assert stats["inconsistent"] is False and stats["version"] == version
    prompts = [[i + 2, 9, 4, 7] for i in range(6)]
    oracle_b, oracle_a = LLMEngine(config(models[1])), LLMEngine(config(models[0]))

    async def generate_all():
        return await asyncio.gather(*(pool.generate(p, GREEDY) for p in prompts))
    served = run(generate_all())
    assert {t[0].metrics["worker"] for t in served} == {1}                 # never routed to the held worker
    assert all(set(t[0].versions) == {version} for t in served)
    assert [t[0].token_ids for t in served] == [c.token_ids for c in oracle_b.generate(prompts, GREEDY)]
    # A complete update lands on every live worker, the held one included, and it serves again.
    assert run(pool.update_weights("safetensors", {"path": str(ckpt)}, version=version + 1))["num_workers"] == 2
    health = run(pool.health())
    assert health["ok"] and [w["version"] for w in health["workers"]] == [version + 1] * 2, health
    assert all(w["awaiting_weights"] is None for w in health["workers"])
    served = run(generate_all())
    assert {t[0].metrics["worker"] for t in served} == {0, 1}
    assert [t[0].token_ids for t in served] == [c.token_ids for c in oracle_a.generate(prompts, GREEDY)]
    print(f"restarted worker held out: {w0['awaiting_weights'][:160]}")

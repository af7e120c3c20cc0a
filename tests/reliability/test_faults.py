"""Fault injection, one test per fault: every affected request ends in a clear error or a completed trajectory
(never silence, never a hang), and the service keeps serving afterwards.

- the front end process killed and restarted on the same address while clients stay connected;
- a weight update failing half-way through the front end: old weights serve bitwise, version unchanged;
- an environment that raises, and one that hangs past env_timeout_s;
- a trainer process that dies in the middle of a distributed (gloo) weight broadcast.

Faults of a Ray pool's workers are in test_pool_faults.py. Loopback only; every wait is bounded.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import LLMEngine, SamplingParams
from rollout.backend import ErrorCode, RolloutError
from rollout.client import AsyncRolloutClient, RolloutClient
from rollout.server import BackgroundFrontEnd
from tests.reliability.fault_helpers import BIND, GREEDY, config, free_port, run
from tests.rollout.pool_helpers import REPO, tiny_model_pair

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
    with BackgroundFrontEnd(lambda: local, BIND, allow_update_weights=True) as fe, \
            RolloutClient(fe.address, timeout_s=60) as c:
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

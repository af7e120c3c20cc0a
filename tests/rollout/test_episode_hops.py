"""An episode's engine work never waits for an env-pool thread it does not need: its first turn is queued with its
session's open (not after a hop back to the env pool), and its trajectory is handed over when its session
closes (not after another hop). With one env thread kept busy by another episode's slow reset, both would
otherwise wait for that reset (what a busy pool of env threads, or the GIL, does to every episode)."""
import time

import pytest

from engine import EngineConfig, SamplingParams
from engine.tiny_models import make_tiny_model
from rollout.engine_loop import EngineLoop
from rollout.envs.testing import EchoTestEnvironment

GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)
SLOW_S = 1.5


class KickoffEnvironment(EchoTestEnvironment):
    """Calls ``kick()`` at the end of its ``reset`` or its ``step`` (``at``)."""

    def __init__(self, tokenizer=None, *, kick, at: str, **kwargs) -> None:
        super().__init__(tokenizer, **kwargs)
        self.kick, self.at = kick, at

    def reset(self, **kwargs):
        obs = super().reset(**kwargs)
        if self.at == "reset":
            self.kick()
        return obs

    def step(self, model_token_ids):
        out = super().step(model_token_ids)
        if self.at == "step":
            self.kick()
        return out


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    from rollout.environment import register_environment
    register_environment("kickoff_test", KickoffEnvironment, replace=True)
    path = make_tiny_model("qwen2", tmp_path_factory.mktemp("hops") / "m", seed=3)
    loop = EngineLoop(EngineConfig(model=str(path), num_kv_blocks=256, block_size=8, max_model_len=128),
                      env_threads=1)
    yield loop
    loop.shutdown()


def occupy_env_thread(loop, slow: list):
    """``kick``: queue a slow episode, whose reset takes the (only) env thread next for SLOW_S."""
    return lambda: slow.append(loop.run_episode("slow_test", {"delay_s": SLOW_S, "num_steps": 1}, GREEDY, 1))


@pytest.mark.parametrize("at", ["reset", "step"])
def test_episode_engine_work_waits_for_no_env_thread(loop, at):
    slow: list = []
    turns_before = loop.stats().result(10)["session_turns"]
    t0 = time.monotonic()
    fut = loop.run_episode("kickoff_test", {"kick": occupy_env_thread(loop, slow), "at": at, "num_steps": 1},
                           GREEDY, 1)
    if at == "reset":
        # its env step comes after the slow reset, but its first turn must not
        while loop.stats().result(10)["session_turns"] == turns_before:
            assert time.monotonic() - t0 < SLOW_S / 2, "the first turn waited for the env thread"
            time.sleep(0.005)
    else:
        traj = fut.result(SLOW_S / 2)             # TimeoutError: the trajectory waited for the env thread
        assert traj.turns == 1 and len(traj.token_ids) == 4
    assert fut.result(3 * SLOW_S).turns == 1
    assert slow[0].result(3 * SLOW_S).turns == 1

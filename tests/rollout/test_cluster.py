"""The pool on a two-node Ray cluster simulated on this machine (``ray.cluster_utils.Cluster``: a head and
one worker node, 1 CPU each): placed with SPREAD, one worker per node, reached through ``address=``."""
import asyncio
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from engine.tiny_models import make_tiny_model  # noqa: E402

REPO = str(Path(__file__).resolve().parents[2])
GREEDY = SamplingParams(max_tokens=5, ignore_eos=True)


@pytest.mark.slow
def test_pool_spread_over_two_nodes(tmp_path):
    from ray.cluster_utils import Cluster

    from rollout.pool import RolloutPool
    path = make_tiny_model("qwen2", tmp_path / "m", seed=8)
    config = EngineConfig(model=str(path), num_kv_blocks=128, block_size=8, max_model_len=128)
    ray.shutdown()     # the session's local Ray, if an earlier test started it: the pool must join this cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    pool = None
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        pool = RolloutPool(config, 2, placement="SPREAD", address=cluster.address, num_cpus_per_worker=1.0,
                           runtime_env={"env_vars": {"PYTHONPATH": REPO}}, start_timeout_s=120)
        assert len({info["node_id"] for info in pool.worker_info}) == 2     # one worker per node

        async def session(i):
            sid = await pool.open_session()
            turns = [await pool.step_session(sid, obs, GREEDY) for obs in ([i + 2, i + 3, i + 4], [i + 5])]
            return turns, await pool.close_session(sid)

        async def main():
            return await asyncio.wait_for(asyncio.gather(*(session(i) for i in range(6))), 60)

        results = asyncio.run(main())
        oracle = LLMEngine(config)
        for i, (turns, whole) in enumerate(results):
            sid = oracle.open_session()
            for turn, obs in zip(turns, ([i + 2, i + 3, i + 4], [i + 5])):
                assert turn.token_ids == oracle.run_turn(sid, obs, GREEDY).token_ids
            assert whole.prompt_ids + whole.token_ids == oracle.session_tokens(sid)
            assert len({t.metrics["worker"] for t in turns}) == 1
        assert {whole.metrics["worker"] for _, whole in results} == {0, 1}
        stats = asyncio.run(pool.stats())
        assert stats["total"]["resumed_turns"] == stats["total"]["resident_turns"] == 6
    finally:
        if pool is not None:
            pool.close()
        ray.shutdown()
        cluster.shutdown()

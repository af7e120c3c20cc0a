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


def test_cuda_ipc_update_from_another_process(ckpts):
    model, config = load_model(ckpts["w1"], torch.float32, "cuda")
    ctx = mp.get_context("spawn")
    payloads, done = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_sender.send_ipc,
                        args=(str(ckpts["w2"] / "model.safetensors"), 64 << 10, payloads, done))
    child.start()
    try:
        payload = payloads.get(timeout=120)
        assert len(payload.handles) > 3  # several buckets, not one handle per tensor
        loader = get_loader("cuda_ipc", payload=payload)
        assert loader.version == 3
        report = WeightUpdater(model, config).apply(loader)
        torch.cuda.synchronize()
        assert report.num_tensors == len(loader.names_and_shapes())
    finally:
        done.set()
        child.join(timeout=120)
    assert child.exitcode == 0
    fresh, _ = load_model(ckpts["w2"], torch.float32, "cuda")
    assert_params_bitwise(model, snapshot(fresh))

"""Broadcast from a trainer process over a dedicated gloo group (a spawned process is rank 0, the test rank 1)."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.weight_update import WeightUpdateError, WeightUpdater
from tests.weight_sync import _sender
from engine.weights import load_model
from tests.weight_sync.conftest import assert_params_bitwise, snapshot
from weight_sync import WeightSyncGroupSpec, backend_for, get_loader, init_weight_sync_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason="NCCL needs two GPUs (one per rank)")])])
def test_broadcast_update_after_a_rejected_one(ckpts, device):
    """gloo on CPU; NCCL with the sender on cuda:0 and the engine on cuda:1."""
    engine_device, sender_device = ("cpu", "cpu") if device == "cpu" else ("cuda:1", "cuda:0")
    if device != "cpu":
        torch.cuda.set_device(engine_device)
    model, config = load_model(ckpts["w1"], torch.float32, engine_device)
    updater = WeightUpdater(model, config)
    before = snapshot(model)
    w2 = str(ckpts["w2"] / "model.safetensors")
    port = free_port()
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    w1 = str(ckpts["w1"] / "model.safetensors")
    updates = [(w2, 7, True), (w2, 8, False), (w1, 9, False), (w2, 10, False)]
    child = ctx.Process(target=_sender.send_updates, args=(port, updates, 64 << 10, result, sender_device))
    child.start()
    try:
        group = init_weight_sync_group("127.0.0.1", port, rank=1, world_size=2, device=engine_device,
                                       timeout_s=60)
        assert not dist.is_initialized()  # the default group is never created or touched

        bad = get_loader("distributed", group=group, src=0)
        assert bad.version == 7
        with pytest.raises(WeightUpdateError, match="down_proj.weight' has shape \\(3, 3\\)"):
            updater.apply(bad)  # rejected from the manifest; close() drains the buckets so the sender goes on
        assert_params_bitwise(model, before)

        good = get_loader("distributed", group=group, src=0)
        manifest = good.names_and_shapes()
        assert len(manifest) == len(updater.expected) and good.version == 8
        report = updater.apply(good)
        fresh, _ = load_model(ckpts["w2"], torch.float32, engine_device)
        assert_params_bitwise(model, snapshot(fresh))
        layout = group.layouts[0]
        # Same layout again: the sender sends only the header; the engine reuses its parsed layout, its validated
        # copy plan and the views of the group's persistent receive buffers, yet lands the new values.
        for name, version in (("w1", 9), ("w2", 10)):
            loader = get_loader("distributed", group=group, src=0)
            assert loader.version == version and group.layouts[0] is layout
            updater.apply(loader)
            fresh, _ = load_model(ckpts[name], torch.float32, engine_device)
            assert_params_bitwise(model, snapshot(fresh))
        assert len(updater._bucket_plans) == 1
        status, sent, sender_default_group = result.get(timeout=60)
        assert status == "ok", sent
        assert sent[1] == report.num_bytes and sender_default_group is False
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


def test_group_spec_checks_every_field_and_picks_the_backend_by_device():
    ok = WeightSyncGroupSpec("10.0.0.1", 29500, 3, backend_for("cuda:1"), 30.0, "pool/g1")
    assert ok.backend == "nccl" and backend_for("cpu") == "gloo"
    for kwargs, field in (({"host": ""}, "host"), ({"port": 0}, "port"), ({"port": 70000}, "port"),
                          ({"port": True}, "port"), ({"world_size": 1}, "world_size"), ({"backend": "mpi"}, "backend"),
                          ({"timeout_s": 0}, "timeout_s"), ({"timeout_s": float("inf")}, "timeout_s"),
                          ({"group_name": ""}, "group_name")):
        args = {"host": "10.0.0.1", "port": 29500, "world_size": 3, "backend": "gloo", **kwargs}
        with pytest.raises(ValueError, match=field):
            WeightSyncGroupSpec(**args)
    with pytest.raises(ValueError, match="NCCL backend needs a CUDA device"):
        WeightSyncGroupSpec("127.0.0.1", 29500, 2, "nccl").join(1, device="cpu")

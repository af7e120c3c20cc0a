"""Trainer-side processes for the distributed and CUDA IPC tests (kept light: spawned children import this)."""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from weight_sync import DistributedSender, init_weight_sync_group


def send_updates(port: int, updates: list[tuple[str, int, bool]], bucket_bytes: int, result,
                 device: str = "cpu") -> None:
    """Rank 0 of a 2-rank group (gloo on CPU, NCCL on CUDA): for each (safetensors file, version, corrupt)
    broadcast one update."""
    try:
        if device != "cpu":
            torch.cuda.set_device(device)
        group = init_weight_sync_group("127.0.0.1", port, rank=0, world_size=2, device=device, timeout_s=60)
        sender = DistributedSender(group, bucket_bytes=bucket_bytes)
        sent = []
        for path, version, corrupt in updates:
            sd = load_file(path)
            if corrupt:  # wrong shape: the engine must reject it from the manifest and still drain it
                sd["model.layers.0.mlp.down_proj.weight"] = torch.zeros(3, 3)
            sent.append(sender.send(sd, version=version))
        result.put(("ok", sent, dist.is_initialized()))
    except BaseException as e:  # report, don't hang the parent
        result.put(("error", repr(e), None))


def send_ipc(updates: list[tuple[str, int]], bucket_bytes: int, payloads, acks) -> None:
    """Trainer on the GPU: for each (safetensors file, version), pack the checkpoint into the sender's persistent
    CUDA IPC buckets, hand out the payload and wait until the engine says it has applied it."""
    from weight_sync import CudaIpcSender

    sender = CudaIpcSender(bucket_bytes=bucket_bytes)
    for path, version in updates:
        sd = {n: t.cuda() for n, t in load_file(path).items()}
        payloads.put(sender.pack(sd, version=version))
        acks.get(timeout=120)
    sender.release()


def send_part_and_die(group, path: str, version: int, buckets_to_send: int, bucket_bytes: int,
                      device: str = "cpu") -> None:
    """As the trainer (rank ``group.rank``): the header and the first ``buckets_to_send`` buckets of a real update
    (a safetensors file), from buffers on ``device``, then this process dies."""
    from weight_sync.buckets import named_tensor_list, pack_bucket, plan_buckets
    from weight_sync.distributed import send_layout
    tensors = named_tensor_list(load_file(path))
    plan = plan_buckets(tensors, bucket_bytes, version)
    assert len(plan.bucket_sizes) > buckets_to_send
    send_layout(group, plan, version)
    by_name = dict(tensors)
    for b in range(buckets_to_send):
        buf = torch.empty(plan.bucket_sizes[b], dtype=torch.uint8)
        pack_bucket(plan, b, by_name, buf)
        group.broadcast(buf.to(device), group.rank).wait()
    if device != "cpu":
        torch.cuda.synchronize()
    time.sleep(0.2)
    os._exit(1)                                  # the trainer crashes mid-update


def send_part_and_die_on(device: str, port: int, path: str, version: int, buckets_to_send: int,
                         bucket_bytes: int) -> None:
    """``send_part_and_die`` as rank 0 of a group on ``device`` (NCCL on CUDA)."""
    if device != "cpu":
        torch.cuda.set_device(device)
    group = init_weight_sync_group("127.0.0.1", port, rank=0, world_size=2, device=device, timeout_s=20)
    send_part_and_die(group, path, version, buckets_to_send, bucket_bytes, device)

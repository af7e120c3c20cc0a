"""HostKVCache (engine.kv_offload): block-major host copies, runs of consecutive host blocks, the read-before-
write contract within one step, and on CUDA: pinned memory, a side stream, restores reported only once
their copies completed, the main stream never waiting for them."""
import random

import pytest
import torch

from engine.kv_cache import allocate_kv_cache, kv_storage
from engine.kv_offload import HostKVCache, _runs

CUDA = torch.cuda.is_available()


def caches(num_layers=3, num_blocks=16, bs=4, h=2, d=8, device="cpu", dtype=torch.float32, seed=0, one_storage=True):
    """Random KV caches, as ``allocate_kv_cache`` lays them out (views of one tensor) or one tensor a layer."""
    g = torch.Generator().manual_seed(seed)
    if one_storage:
        storage = torch.randn(2 * num_layers, num_blocks, bs, h, d, generator=g).to(device, dtype)
        kv = [(storage[2 * i], storage[2 * i + 1]) for i in range(num_layers)]
        assert kv_storage(kv) is storage
        return kv
    return [(torch.randn(num_blocks, bs, h, d, generator=g).to(device, dtype),
             torch.randn(num_blocks, bs, h, d, generator=g).to(device, dtype)) for _ in range(num_layers)]


def block(kv, b):
    return torch.stack([c[b] for pair in kv for c in pair])


def test_runs_of_consecutive_ids():
    assert _runs([]) == []
    assert _runs([3]) == [(0, 3, 1)]
    assert _runs([1, 2, 3, 7, 8, 10]) == [(0, 1, 3), (3, 7, 2), (5, 10, 1)]


def step(host, swap_out, swap_in, restores=()):
    gathered = host.gather(swap_out)
    host.copy(gathered, swap_in, list(restores))


def test_kv_storage_finds_the_one_tensor_of_every_layer():
    from types import SimpleNamespace
    config = SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=8)
    kv = allocate_kv_cache(config, 5, 4, torch.float32, "cpu")
    storage = kv_storage(kv)
    assert storage is not None and storage.shape == (6, 5, 4, 2, 8)
    assert all(c.is_contiguous() for pair in kv for c in pair)
    kv[1][1][3].fill_(7.0)                                        # layer 1's V, block 3
    assert torch.all(storage[3, 3] == 7.0)
    assert kv_storage(caches(one_storage=False)) is None
    assert kv_storage(list(reversed(kv))) is None


@pytest.mark.parametrize("one_storage", [True, False])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_offload_then_restore_is_bitwise_and_reports_landing(device, one_storage):
    kv = caches(device=device, one_storage=one_storage)
    host = HostKVCache(kv, 12)
    if device == "cuda":
        assert host.host.is_pinned()
    orig = {b: block(kv, b).clone() for b in range(16)}
    rng = random.Random(0)
    out_blocks = rng.sample(range(16), 9)
    host_ids = [0, 1, 2, 5, 6, 9, 10, 11, 3]                  # runs and singletons
    step(host, list(zip(out_blocks, host_ids)), [])
    for c in (x for pair in kv for x in pair):               # the device blocks are overwritten afterwards
        c[out_blocks] = -1.0
    dst = rng.sample(range(16), 9)
    step(host, [], list(zip(host_ids, dst)), restores=[7])
    landed = host.wait() if device == "cuda" else host.poll()
    assert landed == [7] and host.poll() == []
    for b_src, b_dst in zip(out_blocks, dst):
        assert torch.equal(block(kv, b_dst), orig[b_src])


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_one_step_may_restore_into_blocks_it_offloads_and_reuse_host_blocks(device):
    """Reads before writes: a device block leaving and a host block being read are both reused in the step
    (on CUDA: across the two copy streams, and without a synchronize between the steps)."""
    kv = caches(device=device)
    host = HostKVCache(kv, 4)
    orig = {b: block(kv, b).clone() for b in range(16)}
    step(host, [(0, 0), (1, 1)], [])                           # session A -> host 0, 1
    # one step: B (device 2, 3) leaves into host 0, 1 while A comes back into device 2, 3
    step(host, [(2, 0), (3, 1)], [(0, 2), (1, 3)], restores=[1])
    step(host, [], [(0, 5), (1, 6)], restores=[2])             # B back, from the host blocks it reused
    if device == "cuda":
        torch.cuda.synchronize()                               # the copy streams are not the current stream
    assert torch.equal(block(kv, 2), orig[0]) and torch.equal(block(kv, 3), orig[1])
    assert torch.equal(block(kv, 5), orig[2]) and torch.equal(block(kv, 6), orig[3])
    assert host.poll() == [1, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_copies_overlap_the_main_stream_and_land_later():
    """A large restore runs on the side stream: the host returns at once, the main stream keeps running a
    long kernel meanwhile, poll() reports the restore only once its copy completed, and the KV is exact."""
    kv = caches(num_layers=8, num_blocks=512, bs=16, h=8, d=128, device="cuda", dtype=torch.bfloat16)
    host = HostKVCache(kv, 512)
    src = list(range(256))
    orig = [block(kv, b).clone() for b in src]
    step(host, list(zip(src, range(256))), [])
    torch.cuda.synchronize()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    step(host, [], list(zip(range(256), range(256, 512))), restores=[42])
    landed_early = host.poll()
    for _ in range(20):
        a = a @ a * 1e-4                                       # main-stream work queued behind the copy
    t1.record()
    assert landed_early == []                                  # nothing synchronized: not landed yet
    torch.cuda.synchronize()
    assert host.poll() == [42]
    for i, b in enumerate(range(256, 512)):
        assert torch.equal(block(kv, b), orig[i])
    assert t0.elapsed_time(t1) > 0

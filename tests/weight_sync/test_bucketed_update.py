"""The updater's bulk path for bucketed loaders (``engine.bucket_copy``): layout validated once and cached, one
multi-tensor copy per bucket, rollback of every written bucket on a failure half-way, no rollback copy for loaders
whose buckets are all resident before the first write.

``PackedBuckets`` below is a real bucketed loader over in-process buffers (the same packing as the CUDA IPC and
broadcast senders, minus the transport), so the updater's handling of every flag and failure can be driven on CPU;
the transports themselves are tested in test_distributed.py (gloo, and NCCL on two GPUs) and test_cuda_ipc.py.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # the bucket copy kernel (engine.kernels.bulk_copy, imported at its first use) runs under the interpreter
    os.environ["TRITON_INTERPRET"] = "1"
from safetensors.torch import load_file

from engine.weight_update import WeightsInconsistentError, WeightUpdateError, WeightUpdater
from tests.weight_sync.conftest import assert_params_bitwise, assert_same_as_fresh, load, snapshot
from weight_sync import StateDictLoader
from weight_sync.buckets import BucketPlan, named_tensor_list, pack_bucket, plan_buckets


class PackedBuckets:
    """Bucketed loader over buffers packed in this process. ``buffers``: reuse these (persistent mode);
    ``fail_at``: raise when bucket ``fail_at`` is requested; ``bad_bucket``: yield this (index, tensor) instead of
    the next bucket."""

    def __init__(self, sd, *, bucket_bytes=4 << 10, resident=False, buffers=None, fail_at=None, bad_bucket=None,
                 order=None):
        tensors = named_tensor_list(sd)
        plan = plan_buckets(tensors, bucket_bytes)
        self.plan = BucketPlan.from_bytes(plan.to_bytes())  # as a receiver sees it: parsed once per layout
        self.buffers = buffers or [torch.empty(n, dtype=torch.uint8) for n in plan.bucket_sizes]
        for b, buf in enumerate(self.buffers):
            pack_bucket(plan, b, dict(tensors), buf)
        self.buckets_resident = resident
        self.persistent_buffers = buffers is not None
        self.fail_at, self.bad_bucket, self.order = fail_at, bad_bucket, order
        self.version = None
        self.yielded = 0
        self.closed = 0

    def bucket_plan(self):
        return self.plan

    def iter_buckets(self):
        for b in self.order if self.order is not None else range(len(self.buffers)):
            if self.fail_at == b:
                raise ConnectionError("trainer went away")
            if self.bad_bucket is not None and self.yielded == 1:
                yield self.bad_bucket
            self.yielded += 1
            yield b, self.buffers[b]

    def iter_tensors(self):  # the per-tensor protocol is never used when the bulk one is there
        raise AssertionError("bulk path expected")

    def names_and_shapes(self):
        return self.plan.manifest()

    def close(self):
        self.closed += 1


def sd_of(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture
def served(ckpts):
    model, config = load(ckpts["w1"])
    return model, WeightUpdater(model, config), snapshot(model)


@pytest.mark.parametrize("resident", [False, True])
def test_bucketed_update_equals_fresh_load_in_any_bucket_order(served, ckpts, resident):
    model, updater, _ = served
    sd = sd_of(ckpts["w2"])
    loader = PackedBuckets(sd, resident=resident)
    order = list(range(len(loader.buffers)))[::-1]
    assert len(order) > 4  # several buckets, fused qkv / gate_up shards spread across them
    loader.order = order
    report = updater.apply(loader)
    assert_same_as_fresh(model, ckpts["w2"])
    assert loader.closed == 1 and set(report.names_updated) == set(sd)
    assert report.num_bytes == sum(t.numel() * t.element_size() for t in sd.values())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert report.backup_bytes == (0 if resident else param_bytes)  # resident: nothing can fail half-way


def test_layout_validated_once_and_reused_buffers_deliver_new_values(served, ckpts):
    """Persistent buffers: the cached source views read the refilled buffers, so each update lands its values."""
    model, updater, _ = served
    first = PackedBuckets(sd_of(ckpts["w2"]), resident=True, buffers=None)
    buffers = first.buffers
    first.persistent_buffers = True
    updater.apply(first)
    assert_same_as_fresh(model, ckpts["w2"])
    for name in ("w1", "w2", "w1"):
        updater.apply(PackedBuckets(sd_of(ckpts[name]), resident=True, buffers=buffers))
        assert_same_as_fresh(model, ckpts[name])
    assert len(updater._bucket_plans) == 1
    # A bf16 trainer has another layout (half the bytes): its own plan, cast on copy.
    updater.apply(PackedBuckets(sd_of(ckpts["w2_bf16"]), resident=True))
    assert len(updater._bucket_plans) == 2
    assert_same_as_fresh(model, ckpts["w2_bf16"])


@pytest.mark.parametrize("resident", [False, True])
def test_failure_half_way_rolls_back_bitwise(served, ckpts, resident):
    model, updater, before = served
    loader = PackedBuckets(sd_of(ckpts["w2"]), resident=resident, fail_at=3)
    with pytest.raises(WeightUpdateError, match="rolled back: loader raised ConnectionError: trainer went away"):
        updater.apply(loader)
    assert loader.closed == 1 and loader.yielded == 3
    assert_params_bitwise(model, before)
    assert not updater.inconsistent


@pytest.mark.parametrize("bad, message", [
    ((1, None), "bucket 1 must be a contiguous 1-D uint8 tensor"),
    ((0, "dup"), "yielded bucket 0 twice"),
    ((99, torch.zeros(4, dtype=torch.uint8)), "bucket index 99; the layout has"),
    ((1, torch.zeros(3, dtype=torch.uint8)), "bucket 1 holds 3 bytes; the layout needs"),
    ((1, torch.zeros(4096, dtype=torch.float32)), "bucket 1 must be a contiguous 1-D uint8 tensor"),
    ("not a pair", "bucketed loader"),
])
def test_malformed_bucket_rejected_and_rolled_back(served, ckpts, bad, message):
    model, updater, before = served
    loader = PackedBuckets(sd_of(ckpts["w2"]))
    if bad[1] == "dup":
        bad = (0, loader.buffers[0])
    loader.bad_bucket = bad
    with pytest.raises(WeightUpdateError, match=message):
        updater.apply(loader)
    assert_params_bitwise(model, before)
    updater.apply(StateDictLoader(sd_of(ckpts["w2"])))  # still serviceable
    assert_same_as_fresh(model, ckpts["w2"])


@pytest.mark.parametrize("resident", [False, True])
def test_nan_found_by_check_finite_after_earlier_buckets(served, ckpts, resident):
    model, updater, before = served
    sd = dict(sd_of(ckpts["w2"]))
    name = "model.layers.1.mlp.down_proj.weight"  # layer 1: late in the layout
    sd[name] = sd[name].clone()
    sd[name][2, 3] = float("inf")
    with pytest.raises(WeightUpdateError, match=f"'{name}' has non-finite values"):
        updater.apply(PackedBuckets(sd, resident=resident), check_finite=True)
    assert_params_bitwise(model, before)
    updater.apply(PackedBuckets(sd, resident=resident))  # accepted without the check
    assert torch.isinf(model.layers[1].down_proj.weight).sum() == 1


def test_missing_bucket_and_bad_layout_rejected(served, ckpts):
    model, updater, before = served
    loader = PackedBuckets(sd_of(ckpts["w2"]), resident=True)
    loader.order = list(range(len(loader.buffers)))[:-1]  # last bucket never delivered
    with pytest.raises(WeightUpdateError, match="declared but never delivered buckets"):
        updater.apply(loader)
    assert_params_bitwise(model, before)
    sd = dict(sd_of(ckpts["w2"]))
    sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"][:, :-1]
    loader = PackedBuckets(sd)
    with pytest.raises(WeightUpdateError, match="before any write: weight 'model.layers.0.self_attn.k_proj.weight' "
                                                "has shape"):
        updater.apply(loader)
    assert loader.yielded == 0 and loader.closed == 1
    assert_params_bitwise(model, before)


def test_no_budget_half_way_is_inconsistent_until_a_complete_update(served, ckpts):
    model, updater, _ = served
    with pytest.raises(WeightsInconsistentError, match="without a backup"):
        updater.apply(PackedBuckets(sd_of(ckpts["w2"]), fail_at=2), backup_budget_bytes=0)
    assert updater.inconsistent
    updater.apply(PackedBuckets(sd_of(ckpts["w2"])))
    assert not updater.inconsistent
    assert_same_as_fresh(model, ckpts["w2"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU buffers: on CUDA the IPC tests run the kernel natively")
def test_resident_update_through_the_copy_kernel_equals_a_fresh_load(ckpts):
    """Every tensor the kernel can take goes in its one launch, the rest (here: a bf16 trainer's tensors cast to
    the fp32 engine) through the per-tensor copies; refilled persistent buffers reuse the chunk table."""
    pytest.importorskip("triton")
    model, config = load(ckpts["w1"])
    updater = WeightUpdater(model, config)
    updater.copy_kernel_device = torch.device("cpu")          # forced: the CPU default is the per-tensor copies
    first = PackedBuckets(sd_of(ckpts["w2"]), resident=True)
    updater.apply(first)
    assert_same_as_fresh(model, ckpts["w2"])
    plan = next(iter(updater._bucket_plans.values()))
    table = plan.chunks.table
    assert table.num_chunks >= len(plan.names) // 2           # most tensors through the kernel
    for name in ("w1", "w2"):
        updater.apply(PackedBuckets(sd_of(ckpts[name]), resident=True, buffers=first.buffers))
        assert_same_as_fresh(model, ckpts[name])
    assert plan.chunks.table is table                          # same buffers: the table was kept
    updater.apply(PackedBuckets(sd_of(ckpts["w2_bf16"]), resident=True))
    bf16_plan = next(reversed(updater._bucket_plans.values()))
    assert bf16_plan.chunks.rest and bf16_plan.chunks.table is None   # every tensor needs a cast
    assert_same_as_fresh(model, ckpts["w2_bf16"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU buffers: on CUDA the IPC tests run the kernel natively")
def test_resident_update_splits_large_tensors_to_memcpys(ckpts, monkeypatch):
    """Tensors at or over ``KERNEL_MAX_BYTES`` get one copy each, the smaller ones share the kernel's launch; both
    land bitwise, and a changed split rebuilds the table instead of reusing the old one."""
    pytest.importorskip("triton")
    from engine import bucket_copy

    model, config = load(ckpts["w1"])
    updater = WeightUpdater(model, config)
    updater.copy_kernel_device = torch.device("cpu")
    sizes = sorted(t.numel() * t.element_size() for t in sd_of(ckpts["w2"]).values())
    threshold = sizes[len(sizes) // 2]                         # about half of the tensors each way
    monkeypatch.setattr(bucket_copy, "KERNEL_MAX_BYTES", threshold)
    loader = PackedBuckets(sd_of(ckpts["w2"]), resident=True)
    updater.apply(loader)
    assert_same_as_fresh(model, ckpts["w2"])
    plan = next(iter(updater._bucket_plans.values()))
    large = {plan.buckets[b].names[i] for b, i in plan.chunks.large}
    expected_large = {n for n, t in sd_of(ckpts["w2"]).items()
                      if t.numel() * t.element_size() >= threshold and n in plan.names}
    assert large == expected_large and 0 < len(large) < len(plan.names)
    assert plan.chunks.table.num_chunks >= len(plan.names) - len(large) - len(plan.chunks.rest)
    monkeypatch.setattr(bucket_copy, "KERNEL_MAX_BYTES", None)   # everything through the kernel: a new table
    updater.apply(PackedBuckets(sd_of(ckpts["w1"]), resident=True, buffers=loader.buffers))
    assert_same_as_fresh(model, ckpts["w1"])
    assert plan.chunks.large == [] and plan.chunks.kernel_max_bytes is None
    with pytest.raises(ValueError, match="kernel_max_bytes must be a positive int or None"):
        bucket_copy.copy_resident(plan, [], torch.device("cpu"), kernel_max_bytes=0)

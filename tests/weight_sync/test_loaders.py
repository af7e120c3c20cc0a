"""Built-in loaders and the registry: each applies W2 so the model equals a fresh load of W2, bitwise."""
from __future__ import annotations

import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file

import weight_sync
from engine.weight_update import WeightUpdateError, WeightUpdater
from tests.weight_sync.conftest import assert_params_bitwise, assert_same_as_fresh, load, snapshot
from weight_sync import (CudaIpcLoader, CudaIpcSender, RayObjectLoader, SafetensorsLoader, StateDictLoader,
                         available_loaders, get_loader, plan_buckets, put_state_dict, register_loader)
from weight_sync.buckets import ALIGN, BucketPlan, pack_bucket, unpack_bucket


def apply(ckpts, loader, base="w1", **kwargs):
    model, config = load(ckpts[base])
    WeightUpdater(model, config).apply(loader, **kwargs)
    return model


# ------------------------------------------------------------------------------------------------ buckets
def test_bucket_plan_pack_unpack_roundtrip():
    tensors = [("a", torch.randn(10, 3)), ("b", torch.randn(7).to(torch.bfloat16)), ("c", torch.tensor(2.5)),
               ("big", torch.randn(300)), ("d", torch.randn(2, 2).t())]  # non-contiguous source
    plan = plan_buckets(tensors, bucket_bytes=512, version=7)
    assert all(e.offset % ALIGN == 0 for e in plan.entries)
    # a: 120 B at 0, b: 14 B at 256 (aligned), c would start at 512 = the cap -> bucket 1; "big" (1200 B) alone
    assert [e.bucket for e in plan.entries] == [0, 0, 1, 2, 3]
    assert plan.bucket_sizes == (270, 4, 1200, 16)
    parsed = BucketPlan.from_bytes(plan.to_bytes())
    assert parsed.version is None and parsed.manifest()["b"] == ((7,), torch.bfloat16)  # version travels beside
    assert parsed.key == plan.key and parsed.entries == plan.entries and parsed.bucket_sizes == plan.bucket_sizes
    assert BucketPlan.from_bytes(plan.to_bytes()) is parsed  # parsed once per layout
    assert plan_buckets(tensors, bucket_bytes=512, version=8).key == plan.key
    assert plan_buckets(tensors[:-1], bucket_bytes=512).key != plan.key
    plan = parsed
    got = {}
    for b, size in enumerate(plan.bucket_sizes):
        buf = torch.empty(size, dtype=torch.uint8)
        pack_bucket(plan, b, dict(tensors), buf)
        got.update((n, t.clone()) for n, t in unpack_bucket(plan, b, buf))
    for name, t in tensors:
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)


def test_bucket_plan_casts_floating_tensors_while_packing():
    """An fp32 trainer sending to a bf16 engine: floating tensors are planned and packed in the cast dtype (half the
    bytes), each equal to torch's own conversion of it; integer tensors travel as they are."""
    tensors = [("w", torch.randn(33, 5)), ("h", torch.randn(9).to(torch.float16)), ("ids", torch.arange(6)),
               ("t", torch.randn(4, 3).t())]
    plan = plan_buckets(tensors, bucket_bytes=1 << 20, cast=torch.bfloat16)
    assert [e.dtype for e in plan.entries] == [torch.bfloat16, torch.bfloat16, torch.int64, torch.bfloat16]
    assert sum(e.nbytes for e in plan.entries) == 33 * 5 * 2 + 9 * 2 + 6 * 8 + 12 * 2
    buf = torch.empty(plan.bucket_sizes[0], dtype=torch.uint8)
    pack_bucket(plan, 0, dict(tensors), buf)
    got = dict(unpack_bucket(plan, 0, buf))
    for name, t in tensors:
        want = t.to(torch.bfloat16) if t.dtype.is_floating_point else t
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    with pytest.raises(ValueError, match="cast must be a floating-point"):
        plan_buckets(tensors, bucket_bytes=512, cast=torch.int32)


# ------------------------------------------------------------------------------------------------ safetensors
@pytest.mark.parametrize("source", ["file", "dir", "sharded_dir", "sharded_index", "bf16"])
def test_safetensors_loader(ckpts, source):
    path = {"file": ckpts["w2"] / "model.safetensors", "dir": ckpts["w2"], "sharded_dir": ckpts["w2_sharded"],
            "sharded_index": ckpts["w2_sharded"] / "model.safetensors.index.json", "bf16": ckpts["w2_bf16"]}[source]
    loader = get_loader("safetensors", path=path, version=3)
    assert loader.version == 3
    stored = load_file(str((ckpts["w2_bf16"] if source == "bf16" else ckpts["w2"]) / "model.safetensors"))
    assert loader.names_and_shapes() == {n: (tuple(t.shape), t.dtype) for n, t in stored.items()}
    model = apply(ckpts, loader)
    assert_same_as_fresh(model, ckpts["w2_bf16"] if source == "bf16" else ckpts["w2"])  # bf16 -> fp32 cast


def test_safetensors_manifest_reads_headers_only(ckpts, tmp_path):
    """A file cut right after its header still yields the manifest; the engine rejects a bad one without
    touching the (absent) tensor bytes, and a truncated stream fails cleanly with the weights intact."""
    src = ckpts["w2"] / "model.safetensors"
    data = src.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    cut = tmp_path / "model.safetensors"
    cut.write_bytes(data[:8 + header_len])
    assert SafetensorsLoader(cut).names_and_shapes() == SafetensorsLoader(src).names_and_shapes()
    model, config = load(ckpts["tied_w1"])  # another architecture: the manifest cannot match
    before = snapshot(model)
    with pytest.raises(WeightUpdateError, match="before any write"):
        WeightUpdater(model, config).apply(SafetensorsLoader(cut))
    model, config = load(ckpts["w1"])
    before = snapshot(model)
    with pytest.raises(WeightUpdateError, match="rolled back"):
        WeightUpdater(model, config).apply(SafetensorsLoader(cut))
    assert_params_bitwise(model, before)


def test_safetensors_names_subset_and_missing_shard(ckpts, tmp_path):
    names = ["model.norm.weight", "model.layers.0.mlp.down_proj.weight"]
    loader = SafetensorsLoader(ckpts["w2_sharded"], names=names)
    assert sorted(loader.names_and_shapes()) == sorted(names)
    assert sorted(n for n, _ in loader.iter_tensors()) == sorted(names)
    broken = tmp_path / "broken"
    shutil.copytree(ckpts["w2_sharded"], broken)
    next(broken.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(ValueError, match="missing shard files"):
        SafetensorsLoader(broken)


# ------------------------------------------------------------------------------------------------ state dict
def test_state_dict_loader_mapping_and_generator(ckpts):
    sd = load_file(str(ckpts["w2"] / "model.safetensors"))
    loader = StateDictLoader(sd, version=5)
    assert loader.version == 5 and loader.names_and_shapes()["model.norm.weight"] == ((64,), torch.float32)
    assert_same_as_fresh(apply(ckpts, loader), ckpts["w2"])
    gen_loader = StateDictLoader((n, t) for n, t in sd.items())
    assert gen_loader.names_and_shapes() is None
    assert_same_as_fresh(apply(ckpts, gen_loader), ckpts["w2"])


def test_transformers_named_parameters_work_as_is(ckpts):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpts["w2"]))
    assert_same_as_fresh(apply(ckpts, StateDictLoader(hf.named_parameters())), ckpts["w2"])


# ------------------------------------------------------------------------------------------------ registry
class ScaledLoader:
    """A custom loader: another checkpoint's tensors times a factor (what a user might plug in)."""

    def __init__(self, path, factor: float, version=None):
        self.inner, self.factor, self.version = SafetensorsLoader(path), factor, version

    def names_and_shapes(self):
        return self.inner.names_and_shapes()

    def iter_tensors(self):
        for name, t in self.inner.iter_tensors():
            yield name, t * self.factor

    def close(self):
        self.inner.close()


def test_custom_loader_registered_by_name(ckpts):
    register_loader("test_scaled", ScaledLoader)
    try:
        assert "test_scaled" in available_loaders()
        with pytest.raises(ValueError, match="already registered"):
            register_loader("test_scaled", ScaledLoader)
        loader = get_loader("test_scaled", path=ckpts["w2"], factor=1.0, version=9)
        assert isinstance(loader, weight_sync.CheckpointLoader) and loader.version == 9
        assert_same_as_fresh(apply(ckpts, loader), ckpts["w2"])
        model = apply(ckpts, get_loader("test_scaled", path=ckpts["w2"], factor=2.0))
        fresh, _ = load(ckpts["w2"])
        assert torch.equal(model.norm.weight, fresh.norm.weight * 2)
        with pytest.raises(TypeError):
            get_loader("test_scaled", path=ckpts["w2"], factr=2.0)  # typo is an error, not dropped
    finally:
        weight_sync.base._REGISTRY.pop("test_scaled")
    with pytest.raises(ValueError, match="unknown loader 'test_scaled'; registered: .*safetensors"):
        get_loader("test_scaled")


# ------------------------------------------------------------------------------------------------ ray
@pytest.fixture(scope="module")
def ray_local():
    pytest.importorskip("ray")
    from tests.rollout.pool_helpers import local_ray
    yield local_ray()


def test_ray_object_loader(ckpts, ray_local):
    sd = load_file(str(ckpts["w2"] / "model.safetensors"))
    refs = put_state_dict(sd, bucket_bytes=64 << 10, version=4)
    assert len(refs) > 3  # manifest + several buckets, not one object per tensor
    assert len(refs) - 1 < len(sd)
    loader = get_loader("ray", refs=refs)
    assert loader.version == 4
    assert_same_as_fresh(apply(ckpts, loader), ckpts["w2"])


def test_ray_object_loader_rejects_wrong_model(ckpts, ray_local):
    model, config = load(ckpts["tied_w1"])
    before = snapshot(model)
    refs = put_state_dict(load_file(str(ckpts["w2"] / "model.safetensors")), bucket_bytes=64 << 10)
    with pytest.raises(WeightUpdateError, match="before any write"):
        WeightUpdater(model, config).apply(RayObjectLoader(refs))
    assert_params_bitwise(model, before)


# ------------------------------------------------------------------------------------------------ CUDA IPC
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_ipc_needs_cuda():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        CudaIpcSender()
    with pytest.raises(RuntimeError, match="needs CUDA"):
        CudaIpcLoader(None)

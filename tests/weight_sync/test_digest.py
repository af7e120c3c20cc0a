"""Content digests of updates (``weight_sync.digest``): independent of order and transport, sensitive to every
byte, name, shape and dtype; through the engine's apply, a re-read source whose bytes changed is refused and
rolled back, on the per-tensor and on the bulk (bucketed) path."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import weight_sync.digest as digest_mod
from engine.weight_update import WeightUpdateError, WeightUpdater
from tests.weight_sync.conftest import assert_params_bitwise, assert_same_as_fresh, load, snapshot
from tests.weight_sync.test_bucketed_update import PackedBuckets
from weight_sync import SafetensorsLoader, StateDictLoader, TensorDigest, digesting


def digest_of(pairs) -> str:
    d = TensorDigest()
    for name, t in pairs:
        d.add(name, t)
    return d.hexdigest()


def read_all(loader) -> str:
    with_digest = digesting(loader)
    if hasattr(with_digest, "iter_buckets"):
        for _ in with_digest.iter_buckets():
            pass
    else:
        for _ in with_digest.iter_tensors():
            pass
    with_digest.close()
    return with_digest.digest


def test_digest_is_of_the_content_not_the_order_or_transport(ckpts):
    sd = load_file(str(ckpts["w2"] / "model.safetensors"))
    items = list(sd.items())
    reference = digest_of(items)
    assert digest_of(reversed(items)) == reference
    assert read_all(StateDictLoader(sd)) == reference
    assert read_all(SafetensorsLoader(ckpts["w2"])) == reference
    assert read_all(SafetensorsLoader(ckpts["w2_sharded"])) == reference           # three shards, same tensors
    for bucket_bytes in (1 << 10, 64 << 10):                                        # other layouts and padding
        assert read_all(PackedBuckets(sd, bucket_bytes=bucket_bytes)) == reference
    assert read_all(StateDictLoader(load_file(str(ckpts["w1"] / "model.safetensors")))) != reference


def test_digest_sees_every_byte_name_shape_and_dtype(monkeypatch):
    base = torch.arange(3000, dtype=torch.float32)
    reference = digest_of([("w", base)])
    flipped = base.clone()
    flipped.view(torch.uint8)[-1] ^= 1                                              # one bit of the last byte
    assert digest_of([("w", flipped)]) != reference
    assert digest_of([("v", base)]) != reference
    assert digest_of([("w", base.view(30, 100))]) != reference
    assert digest_of([("w", base.view(torch.int32))]) != reference                  # same bytes, other dtype
    assert digest_of([("w", base), ("x", base)]) != reference
    # A tensor larger than a chunk is hashed chunk by chunk on threads: still deterministic, still every byte.
    monkeypatch.setattr(digest_mod, "CHUNK_BYTES", 1024)
    chunked = digest_of([("w", base)])
    assert chunked == digest_of([("w", base.clone())]) and chunked != reference     # another construction
    assert digest_of([("w", flipped)]) != chunked
    assert digest_of([("w", base.to(torch.bfloat16))]) != chunked


@pytest.mark.parametrize("path", ["per_tensor", "bucketed", "resident"])
def test_a_source_that_changed_is_refused_and_rolled_back(ckpts, path):
    """Per tensor and bucket by bucket the mismatch shows at the end of the read and the writes are undone;
    resident buckets (no rollback copy) are all read before the first write, so nothing is written at all."""
    model, config = load(ckpts["w1"])
    updater = WeightUpdater(model, config)
    before = snapshot(model)
    w2 = load_file(str(ckpts["w2"] / "model.safetensors"))

    def source(sd):
        return StateDictLoader(sd) if path == "per_tensor" else PackedBuckets(sd, resident=path == "resident")

    recorded = read_all(source(w2))
    changed = dict(w2)
    changed["model.norm.weight"] = changed["model.norm.weight"] + 1.0                # the source was overwritten
    with pytest.raises(WeightUpdateError, match="no longer holds the weights") as info:
        updater.apply(digesting(source(changed), expected=recorded))
    assert recorded in str(info.value) and "rolled back" in str(info.value)
    assert_params_bitwise(model, before)
    replay = digesting(source(w2), expected=recorded)
    updater.apply(replay)                                                           # the same bytes: accepted
    assert replay.digest == recorded
    assert_same_as_fresh(model, ckpts["w2"])


def test_an_overwritten_safetensors_path_no_longer_matches(ckpts, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(load_file(str(ckpts["w2"] / "model.safetensors")), str(path))
    recorded = read_all(SafetensorsLoader(path))
    save_file(load_file(str(ckpts["w1"] / "model.safetensors")), str(path))          # the trainer saved again
    model, config = load(ckpts["w1"])
    with pytest.raises(WeightUpdateError, match="no longer holds"):
        WeightUpdater(model, config).apply(digesting(SafetensorsLoader(path), expected=recorded))

"""WeightUpdater: validation before writes, in-place apply, rollback to bitwise-identical weights on any failure."""
from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from engine.weight_update import UpdateReport, WeightsInconsistentError, WeightUpdateError, WeightUpdater
from tests.weight_sync.conftest import assert_params_bitwise, assert_same_as_fresh, load, snapshot
from weight_sync import StateDictLoader


def hf_state_dict(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


class SpyLoader:
    """A loader over a list of pairs that records what the engine called; optionally raises after ``fail_after``
    tensors and optionally has a manifest."""

    def __init__(self, items, *, manifest=None, fail_after=None):
        self.items, self.manifest, self.fail_after = list(items), manifest, fail_after
        self.version = None
        self.calls: list[str] = []
        self.yielded = 0

    def names_and_shapes(self):
        self.calls.append("names_and_shapes")
        return self.manifest

    def iter_tensors(self):
        self.calls.append("iter_tensors")
        for name, t in self.items:
            if self.fail_after is not None and self.yielded == self.fail_after:
                raise ConnectionError("trainer went away")
            self.yielded += 1
            yield name, t

    def close(self):
        self.calls.append("close")


@pytest.fixture
def served(ckpts):
    """A W1 model, its updater, and a snapshot of its weights."""
    model, config = load(ckpts["w1"])
    return model, WeightUpdater(model, config), snapshot(model)


def test_full_update_equals_fresh_load_and_reports(served, ckpts):
    model, updater, _ = served
    sd = hf_state_dict(ckpts["w2"])
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    report = updater.apply(StateDictLoader(sd))
    assert_same_as_fresh(model, ckpts["w2"])
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == storage  # in place: same storage
    assert isinstance(report, UpdateReport)
    assert report.num_tensors == len(sd) and set(report.names_updated) == set(sd)
    assert report.num_bytes == sum(t.numel() * t.element_size() for t in sd.values())
    assert report.seconds >= 0 and not updater.inconsistent


def test_any_order_and_streamed_without_manifest(served, ckpts):
    model, updater, _ = served
    items = list(hf_state_dict(ckpts["w2"]).items())
    random.Random(0).shuffle(items)  # fused qkv / gate_up shards arrive scattered
    loader = SpyLoader(items)
    updater.apply(loader)
    assert_same_as_fresh(model, ckpts["w2"])
    assert loader.calls == ["names_and_shapes", "iter_tensors", "close"]


def test_tied_embeddings_ignore_lm_head(ckpts):
    import transformers

    model, config = load(ckpts["tied_w1"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpts["tied_w2"]))
    sd = hf.state_dict()
    assert "lm_head.weight" in sd  # transformers lists the tied copy; the engine ignores it
    report = WeightUpdater(model, config).apply(StateDictLoader(sd))
    assert "lm_head.weight" not in report.names_updated
    assert_same_as_fresh(model, ckpts["tied_w2"])
    assert model.lm_head.weight is model.embed_tokens.weight


def _corrupt(sd: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    if kind == "missing":
        del sd["model.layers.1.mlp.up_proj.weight"]
    elif kind == "unexpected":
        sd["model.layers.7.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"]
    elif kind == "shape":
        sd["model.layers.1.self_attn.k_proj.weight"] = sd["model.layers.1.self_attn.k_proj.weight"][:, :-1]
    elif kind == "dtype":
        sd["model.layers.1.self_attn.v_proj.weight"] = sd["model.layers.1.self_attn.v_proj.weight"].to(torch.int32)
    elif kind == "nan":
        t = sd["model.layers.1.mlp.down_proj.weight"].clone()
        t[3, 5] = float("nan")
        sd["model.layers.1.mlp.down_proj.weight"] = t
    return sd


# kind -> what the error must name
CORRUPTIONS = {
    "missing": r"lacks weights model\.layers\.1\.mlp\.up_proj\.weight",
    "unexpected": r"unknown weight 'model\.layers\.7\.mlp\.up_proj\.weight'",
    "shape": r"'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \(32, 63\), expected \(32, 64\)",
    "dtype": r"'model\.layers\.1\.self_attn\.v_proj\.weight' has non-floating dtype torch\.int32",
    "nan": r"'model\.layers\.1\.mlp\.down_proj\.weight' has non-finite values",
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_manifest_rejected_before_any_read(served, ckpts, kind):
    model, updater, before = served
    sd = _corrupt(hf_state_dict(ckpts["w2"]), kind)
    manifest = {n: (tuple(t.shape), t.dtype) for n, t in sd.items()}
    loader = SpyLoader(sd.items(), manifest=manifest)
    with pytest.raises(WeightUpdateError, match=CORRUPTIONS[kind]):
        updater.apply(loader, check_finite=True)
    if kind != "nan":  # values are only visible in the tensors themselves
        assert loader.calls == ["names_and_shapes", "close"]  # no tensor was read
    assert_params_bitwise(model, before)
    assert not updater.inconsistent


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_stream_rolled_back_bitwise(served, ckpts, kind):
    model, updater, before = served
    items = sorted(_corrupt(hf_state_dict(ckpts["w2"]), kind).items(), key=lambda kv: "layers.1" in kv[0])
    loader = SpyLoader(items)  # no manifest: layer 0 and globals are written before the bad tensor shows up
    with pytest.raises(WeightUpdateError, match=CORRUPTIONS[kind]):
        updater.apply(loader, check_finite=True)
    assert loader.yielded > 5 and loader.calls[-1] == "close"
    assert_params_bitwise(model, before)
    assert not updater.inconsistent
    updater.apply(StateDictLoader(hf_state_dict(ckpts["w2"])))  # still serviceable
    assert_same_as_fresh(model, ckpts["w2"])


def test_nan_accepted_without_check_finite(served, ckpts):
    model, updater, _ = served
    updater.apply(StateDictLoader(_corrupt(hf_state_dict(ckpts["w2"]), "nan")))
    assert torch.isnan(model.layers[1].down_proj.weight).sum() == 1


def test_loader_raising_half_way_rolls_back(served, ckpts):
    model, updater, before = served
    sd = hf_state_dict(ckpts["w2"])
    manifest = {n: (tuple(t.shape), t.dtype) for n, t in sd.items()}
    loader = SpyLoader(sd.items(), manifest=manifest, fail_after=len(sd) // 2)
    with pytest.raises(WeightUpdateError, match="rolled back: loader raised ConnectionError: trainer went away"):
        updater.apply(loader)
    assert loader.calls[-1] == "close"
    assert_params_bitwise(model, before)


def test_duplicate_and_manifest_mismatch_rejected(served, ckpts):
    model, updater, before = served
    sd = hf_state_dict(ckpts["w2"])
    name = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(WeightUpdateError, match=f"'{name}' given twice"):
        updater.apply(SpyLoader([*sd.items(), (name, sd[name])]))
    assert_params_bitwise(model, before)
    manifest = {n: (tuple(t.shape), t.dtype) for n, t in sd.items()}
    lying = dict(sd, **{name: sd[name].to(torch.bfloat16)})  # the stream differs from what was declared
    with pytest.raises(WeightUpdateError, match=f"'{name}' arrived as .*bfloat16, the manifest declared"):
        updater.apply(SpyLoader(lying.items(), manifest=manifest))
    assert_params_bitwise(model, before)
    short = {n: t for n, t in sd.items() if n != name}  # declared but never delivered
    with pytest.raises(WeightUpdateError, match=f"declared but never delivered {name}"):
        updater.apply(SpyLoader(short.items(), manifest=manifest))
    assert_params_bitwise(model, before)


def test_no_backup_budget_makes_midway_failure_inconsistent(served, ckpts):
    model, updater, before = served
    sd = hf_state_dict(ckpts["w2"])
    with pytest.raises(WeightsInconsistentError, match="without a backup") as info:
        updater.apply(SpyLoader(sd.items(), fail_after=4), backup_budget_bytes=0)
    assert info.value.inconsistent and isinstance(info.value, WeightUpdateError)
    assert updater.inconsistent
    with pytest.raises(WeightsInconsistentError, match="only a complete update"):
        updater.apply(StateDictLoader({"model.norm.weight": sd["model.norm.weight"]}), partial=True)
    # a failure before any write leaves nothing new to undo, but the state stays inconsistent
    with pytest.raises(WeightsInconsistentError, match="remain inconsistent"):
        updater.apply(StateDictLoader(_corrupt(sd, "shape")))
    assert updater.inconsistent
    updater.apply(StateDictLoader(sd), backup_budget_bytes=0)  # a complete update repairs
    assert not updater.inconsistent
    assert_same_as_fresh(model, ckpts["w2"])


def test_budget_covers_first_writes_only(served, ckpts):
    """Slices written while the budget lasts are restored; the error names exactly the unbacked ones."""
    model, updater, before = served
    items = list(hf_state_dict(ckpts["w2"]).items())
    budget = sum(t.numel() * 4 for _, t in items[:3])  # fp32 params: the first three slices fit exactly
    with pytest.raises(WeightsInconsistentError) as info:
        updater.apply(SpyLoader(items, fail_after=6), backup_budget_bytes=budget)
    msg = str(info.value)
    assert "overwriting 3 tensor(s) without a backup" in msg
    assert all(n in msg for n, _ in items[3:6]) and not any(n in msg for n, _ in items[:3])
    for name, _ in items[:3]:
        target = updater.mapper.resolve(name)
        rows = target.shard or slice(None)
        assert torch.equal(dict(model.named_parameters())[target.param_name][rows], before[target.param_name][rows])


def test_partial_update_of_declared_subset(served, ckpts):
    model, updater, before = served
    sd = hf_state_dict(ckpts["w2"])
    subset = {n: sd[n] for n in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight",
                                 "model.norm.weight")}
    with pytest.raises(WeightUpdateError, match="pass partial=True"):
        updater.apply(StateDictLoader(subset))
    assert_params_bitwise(model, before)
    report = updater.apply(StateDictLoader(subset), partial=True)
    assert set(report.names_updated) == set(subset)
    q, kv, inter = 64, 32, 128
    expect = dict(before)
    for name, rows, value in (("layers.0.qkv_proj.weight", slice(q, q + kv), subset[
            "model.layers.0.self_attn.k_proj.weight"]), ("layers.1.gate_up_proj.weight", slice(inter, 2 * inter),
                                                         subset["model.layers.1.mlp.up_proj.weight"])):
        expect[name] = expect[name].clone()
        expect[name][rows] = value
    expect["norm.weight"] = subset["model.norm.weight"]
    assert_params_bitwise(model, expect)


def test_partial_failure_rolls_back_only_its_writes(served, ckpts):
    model, updater, before = served
    sd = hf_state_dict(ckpts["w2"])
    subset = [(n, sd[n]) for n in ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight")]
    with pytest.raises(WeightUpdateError, match="ConnectionError"):
        updater.apply(SpyLoader(subset, fail_after=1), partial=True)
    assert_params_bitwise(model, before)

"""Checkpoint name mapping, loading and config parsing, checked against what transformers writes."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from engine.model_config import ModelConfig
from engine.models import CausalLM, register_architecture
from engine.models import registry
from engine.tiny_models import TINY_ARCHS, make_tiny_model
from engine.weights import WeightMapper, WeightTarget, iter_safetensors, load_model, load_weights


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: make_tiny_model(arch, root / arch, seed=3) for arch in TINY_ARCHS}


def hf_tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


# ------------------------------------------------------------------------------------------- mapping
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_expected_names_are_exactly_what_transformers_saves(ckpts, arch):
    config = ModelConfig.from_pretrained(ckpts[arch])
    saved = {name: tuple(t.shape) for name, t in hf_tensors(ckpts[arch]).items()}
    assert WeightMapper(config).expected_hf_names() == saved


def test_resolve_fused_shards(ckpts):
    config = ModelConfig.from_pretrained(ckpts["qwen2"])  # 4 q heads, 2 kv heads, D=16, I=128, qkv bias
    m = WeightMapper(config)
    assert m.resolve("model.layers.1.self_attn.q_proj.weight") == WeightTarget("layers.1.qkv_proj.weight", slice(0, 64))
    assert m.resolve("model.layers.1.self_attn.k_proj.weight") == WeightTarget("layers.1.qkv_proj.weight", slice(64, 96))
    assert m.resolve("model.layers.1.self_attn.v_proj.bias") == WeightTarget("layers.1.qkv_proj.bias", slice(96, 128))
    assert m.resolve("model.layers.0.mlp.gate_proj.weight") == WeightTarget("layers.0.gate_up_proj.weight", slice(0, 128))
    assert m.resolve("model.layers.0.mlp.up_proj.weight") == WeightTarget("layers.0.gate_up_proj.weight", slice(128, 256))
    assert m.resolve("model.norm.weight") == WeightTarget("norm.weight", None)
    assert m.resolve("lm_head.weight") == WeightTarget("lm_head.weight", None)
    assert m.resolve("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    for bad in ("model.layers.2.mlp.up_proj.weight",  # layer out of range
                "model.layers.0.self_attn.q_norm.weight",  # not a Qwen3
                "model.layers.0.self_attn.o_proj.bias",  # Qwen2 has no o_proj bias
                "model.embed_tokens.bias"):
        with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
            m.resolve(bad)
    tied = WeightMapper(ModelConfig.from_pretrained(ckpts["llama"]))
    assert tied.resolve("lm_head.weight") is None  # tied: extra copy in a checkpoint is ignored
    assert "lm_head.weight" not in tied.expected_hf_names()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_loaded_params_are_the_checkpoint_tensors(ckpts, arch):
    model, config = load_model(ckpts[arch], torch.float32, "cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    sd = hf_tensors(ckpts[arch])
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    for i in range(config.num_layers):
        layer = model.layers[i]
        pre = f"model.layers.{i}."
        fused = torch.cat([sd[pre + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        assert torch.equal(layer.qkv_proj.weight, fused)
        assert (layer.qkv_proj.bias is not None) == (arch in ("qwen2", "qwen2_moe"))
        if arch in ("qwen2", "qwen2_moe"):
            assert torch.equal(layer.qkv_proj.bias[q:q + kv], sd[pre + "self_attn.k_proj.bias"])
        if arch in ("qwen3", "qwen3_moe"):
            assert torch.equal(layer.k_norm.weight, sd[pre + "self_attn.k_norm.weight"])
        if i in config.moe_layers:   # router + experts, [E, 2I, H] / [E, H, I] from per-expert tensors
            assert torch.equal(layer.moe.router.weight, sd[pre + "mlp.gate.weight"])
            for e in range(config.num_experts):
                ex = pre + f"mlp.experts.{e}."
                assert torch.equal(layer.moe.gate_up[e], torch.cat([sd[ex + "gate_proj.weight"],
                                                                    sd[ex + "up_proj.weight"]]))
                assert torch.equal(layer.moe.down[e], sd[ex + "down_proj.weight"])
            if config.shared_expert_intermediate_size:   # Qwen2-MoE's shared expert
                sh = pre + "mlp.shared_expert."
                assert torch.equal(layer.moe.shared_gate_up.weight, torch.cat([sd[sh + "gate_proj.weight"],
                                                                               sd[sh + "up_proj.weight"]]))
                assert torch.equal(layer.moe.shared_down.weight, sd[sh + "down_proj.weight"])
                assert torch.equal(layer.moe.shared_expert_gate.weight, sd[pre + "mlp.shared_expert_gate.weight"])
            continue
        assert torch.equal(layer.gate_up_proj.weight, torch.cat([sd[pre + "mlp.gate_proj.weight"],
                                                                 sd[pre + "mlp.up_proj.weight"]]))
        assert torch.equal(layer.down_proj.weight, sd[pre + "mlp.down_proj.weight"])
        assert layer.gate_up_proj.weight.shape == (2 * inter, config.hidden_size)
    head = sd["model.embed_tokens.weight"] if config.tie_word_embeddings else sd["lm_head.weight"]
    assert torch.equal(model.lm_head.weight, head)


# ------------------------------------------------------------------------------------------- errors
def fresh_model(path) -> CausalLM:
    return CausalLM(ModelConfig.from_pretrained(path))


def test_unknown_name_raises(ckpts):
    named = list(iter_safetensors(ckpts["llama"])) + [("model.layers.0.mlp.extra.weight", torch.zeros(3))]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        load_weights(fresh_model(ckpts["llama"]), named)


def test_wrong_shape_raises_before_writing_it(ckpts):
    model = fresh_model(ckpts["mistral"])
    before = model.layers[1].o_proj.weight.clone()
    named = [(n, t[:-1] if n == "model.layers.1.self_attn.o_proj.weight" else t)
             for n, t in iter_safetensors(ckpts["mistral"])]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight.*shape"):
        load_weights(model, named)
    assert torch.equal(model.layers[1].o_proj.weight, before)


def test_missing_names_raise_when_strict(ckpts):
    named = [(n, t) for n, t in iter_safetensors(ckpts["qwen3"]) if n != "model.layers.1.self_attn.q_norm.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_norm\.weight"):
        load_weights(fresh_model(ckpts["qwen3"]), named)
    loaded = load_weights(fresh_model(ckpts["qwen3"]), named, strict=False)
    assert len(loaded) == len(named)


def test_duplicate_and_integer_tensors_raise(ckpts):
    named = list(iter_safetensors(ckpts["llama"]))
    with pytest.raises(ValueError, match="given twice"):
        load_weights(fresh_model(ckpts["llama"]), named + named[:1])
    bad = [(n, t.to(torch.int32) if n == "model.norm.weight" else t) for n, t in named]
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        load_weights(fresh_model(ckpts["llama"]), bad)


def test_missing_weights_and_config_name_the_path(tmp_path, ckpts):
    with pytest.raises(ValueError, match=str(tmp_path)):
        list(iter_safetensors(tmp_path))
    with pytest.raises(ValueError, match=str(tmp_path)):
        ModelConfig.from_pretrained(tmp_path)
    shutil.copy(ckpts["llama"] / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_model(tmp_path, torch.float32, "cpu")


# ------------------------------------------------------------------------------------------- formats
def test_sharded_checkpoint_loads_identically(tmp_path, ckpts):
    sharded = make_tiny_model("llama3", tmp_path / "sharded", seed=3, shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a, _ = load_model(ckpts["llama3"], torch.float32, "cpu")
    b, _ = load_model(sharded, torch.float32, "cpu")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # a single .safetensors file is a checkpoint too
    single = dict(iter_safetensors(ckpts["llama3"] / "model.safetensors"))
    assert single.keys() == dict(iter_safetensors(sharded)).keys() == set(hf_tensors(ckpts["llama3"]))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_checkpoint_loads(tmp_path, dtype):
    import transformers

    path = make_tiny_model("qwen2", tmp_path, seed=4, dtype=dtype)
    stored = hf_tensors(path)
    assert stored["model.norm.weight"].dtype == getattr(torch, dtype)
    assert ModelConfig.from_pretrained(path).torch_dtype == dtype
    half, _ = load_model(path, getattr(torch, dtype), "cpu")
    assert half.layers[0].qkv_proj.weight.dtype == getattr(torch, dtype)
    assert torch.equal(half.layers[0].qkv_proj.weight[:64], stored["model.layers.0.self_attn.q_proj.weight"])
    # upcast on load: same numbers as transformers reading the same half-precision file into fp32
    full, config = load_model(path, torch.float32, "cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    from engine.attention import build_metadata, build_positions, get_backend
    from engine.kv_cache import allocate_kv_cache

    tokens = list(range(5, 25))
    meta = build_metadata([20], [20], [[3, 1, 4, 0, 2]], 4)
    with torch.no_grad():
        hidden = full(torch.tensor(tokens), torch.from_numpy(build_positions([20], [20])),
                      allocate_kv_cache(config, 5, 4, torch.float32, "cpu"), meta, get_backend("reference"))
        expected = hf(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(full.compute_logits(hidden), expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------- config
def test_classic_top_level_rope_layout(tmp_path, ckpts):
    """A 4.x-era config.json (top-level rope_theta, rope_scaling with the old "type" key) reads the same
    as transformers 5's rope_parameters layout."""
    modern = ModelConfig.from_pretrained(ckpts["llama3"])
    raw = json.loads((ckpts["llama3"] / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    raw["rope_scaling"] = rope
    raw["torch_dtype"] = raw.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    classic = ModelConfig.from_pretrained(tmp_path)
    assert classic == modern
    assert classic.rope_theta == 500000.0
    assert classic.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    # and a plain classic config: top-level rope_theta, no scaling
    raw = json.loads((ckpts["mistral"] / "config.json").read_text())
    raw.pop("rope_parameters")
    raw["rope_theta"] = 12345.0
    (tmp_path / "config.json").write_text(json.dumps(raw))
    plain = ModelConfig.from_pretrained(tmp_path)
    assert plain.rope_theta == 12345.0 and plain.rope_scaling is None and plain.rope_type == "default"


def test_config_fields_from_transformers(ckpts):
    c = ModelConfig.from_pretrained(ckpts["qwen3"])
    assert (c.architecture, c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers) == ("Qwen3ForCausalLM", 4, 2, 16, 2)
    assert c.qk_norm and not c.attention_bias and c.tie_word_embeddings and c.eos_token_ids == (1,)
    q2 = ModelConfig.from_pretrained(ckpts["qwen2"])
    assert q2.attention_bias and not q2.o_proj_bias and not q2.qk_norm and not q2.tie_word_embeddings


def test_unknown_architecture_lists_supported(tmp_path, ckpts):
    raw = json.loads((ckpts["llama"] / "config.json").read_text())
    raw["architectures"] = ["FancyForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"architectures.*FancyForCausalLM.*LlamaForCausalLM"):
        ModelConfig.from_pretrained(tmp_path)


def test_register_architecture_is_one_entry(tmp_path, ckpts, monkeypatch):
    monkeypatch.setattr(registry, "_ARCHITECTURES", dict(registry._ARCHITECTURES))
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ckpts["llama"] / name, tmp_path / name)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["architectures"] = ["MyLlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    register_architecture("MyLlamaForCausalLM", qkv_bias=False, o_proj_bias=False)
    mine, config = load_model(tmp_path, torch.float32, "cpu")
    base, _ = load_model(ckpts["llama"], torch.float32, "cpu")
    assert config.architecture == "MyLlamaForCausalLM"
    assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), base.state_dict().values()))


def test_invariants_are_validated(ckpts):
    from dataclasses import replace

    good = ModelConfig.from_pretrained(ckpts["llama"])
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        replace(good, num_kv_heads=3)
    with pytest.raises(ValueError, match="rope_scaling"):
        replace(good, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="unsupported rope_type"):
        replace(good, rope_scaling={"rope_type": "longrope"})
    with pytest.raises(ValueError, match="hidden_size"):
        replace(good, hidden_size=0)

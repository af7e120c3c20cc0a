"""Tiny random Hugging Face checkpoints for tests and examples (no hub needed).

``make_tiny_model("qwen2", tmp)`` writes ``config.json`` + safetensors built by transformers itself, so
transformers' forward pass on the same directory is an independent oracle for the engine.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

_COMMON: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
    # Large init so greedy argmax has clear margins: fp32 rounding must never flip a near-tie between
    # the engine and transformers.
    initializer_range=0.2,
)

# arch -> (config class name, architecture-specific fields). Tied embeddings and biases vary on purpose.
_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "llama3": ("LlamaConfig", dict(tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 64})),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, attention_bias=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # mixture of experts: layer 0 dense, layer 1 sparse (8 experts, 2 per token, weights renormalised)
    "qwen3_moe": ("Qwen3MoeConfig", dict(tie_word_embeddings=False, attention_bias=False, num_experts=8,
                                         num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                                         decoder_sparse_step=1, mlp_only_layers=[0],
                                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # with a shared expert (and qkv bias, no qk norm): every layer sparse, 8 experts, 2 per token, no renormalisation
    "qwen2_moe": ("Qwen2MoeConfig", dict(tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=48, shared_expert_intermediate_size=80,
                                         norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}

TINY_ARCHS = tuple(_ARCHS)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_tiny_model(
    arch: str,
    path: str | Path,
    *,
    seed: int = 0,
    shards: int = 1,
    dtype: str = "float32",
    **config_overrides: Any,
) -> Path:
    """Build a random ``arch`` model (one of ``TINY_ARCHS``) and ``save_pretrained`` it to ``path``.

    ``shards > 1`` writes a sharded checkpoint with ``model.safetensors.index.json``; ``dtype`` is the
    stored dtype ("float32", "bfloat16", "float16"). ``config_overrides`` must be fields of the config
    class (a typo raises TypeError rather than becoming a silently ignored attribute). Returns ``path``.
    """
    import transformers

    if arch not in _ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {list(_ARCHS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {list(_DTYPES)}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    config_name, arch_fields = _ARCHS[arch]
    config_cls = getattr(transformers, config_name)
    known = set(vars(config_cls())) | set(inspect.signature(config_cls.__init__).parameters)
    unknown = sorted(set(config_overrides) - known - set(_COMMON) - set(arch_fields))
    if unknown:
        raise TypeError(f"{config_name} has no field(s) {unknown}")
    fields = {**_COMMON, **arch_fields, **config_overrides}
    config = config_cls(**fields)
    config.architectures = [config_name.replace("Config", "ForCausalLM")]

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to(_DTYPES[dtype]).eval()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        kwargs["max_shard_size"] = max(1, total // shards)
    model.save_pretrained(str(path), **kwargs)
    return path


# Published shapes (from the models' config.json files) for benchmarks with random weights: only a
# config.json is written; load with EngineConfig(load_format="dummy").
REAL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2.5-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                         eos_token_id=151645)),
    "qwen2.5-1.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                         eos_token_id=151645)),
    "llama-3.1-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 8192},
                                         eos_token_id=128001)),
    "qwen3-1.7b": ("Qwen3Config", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                       head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
                                       tie_word_embeddings=True, attention_bias=False,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                       eos_token_id=151645)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                             moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                                             num_key_value_heads=4, head_dim=128, num_experts=128,
                                             num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                                             mlp_only_layers=[], max_position_embeddings=40960, rms_norm_eps=1e-6,
                                             tie_word_embeddings=False, attention_bias=False,
                                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                             eos_token_id=151645)),
}


def write_real_shape_config(shape: str, path: str | Path) -> Path:
    """Write only ``config.json`` of a published model shape (one of ``REAL_SHAPES``)."""
    import transformers

    if shape not in REAL_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {list(REAL_SHAPES)}")
    config_name, fields = REAL_SHAPES[shape]
    config = getattr(transformers, config_name)(**fields)
    config.architectures = [config_name.replace("Config", "ForCausalLM")]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    return path

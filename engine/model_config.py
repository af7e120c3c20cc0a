"""The model's shape and numerics, read once from a Hugging Face ``config.json``.

``ModelConfig`` is the only thing the engine knows about a model's architecture: the decoder, the weight
mapper and the KV-cache allocator all take it. It is frozen and validated on construction.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from engine.models.registry import get_architecture, supported_architectures

# rope_type -> keys its ``rope_scaling`` dict must carry (besides ``rope_type``).
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str                  # HF architectures[0], e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int                     # query heads
    num_kv_heads: int                  # KV heads (GQA when < num_heads)
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]       # None for plain RoPE; else {"rope_type": ..., **its fields}
    max_position_embeddings: int
    tie_word_embeddings: bool          # lm_head shares embed_tokens' tensor; no lm_head.weight in checkpoints
    attention_bias: bool               # bias on q/k/v (Qwen2: True)
    qk_norm: bool                      # per-head RMSNorm on q and k before rotary (Qwen3)
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: Optional[str] = None  # the checkpoint's declared dtype, e.g. "bfloat16"
    o_proj_bias: bool = False          # bias on o_proj (Llama/Qwen3 with attention_bias=True)
    # Mixture of experts (Qwen3-MoE): the layers in ``moe_layers`` replace the MLP with a router over
    # ``num_experts`` SwiGLU experts of ``moe_intermediate_size``, ``num_experts_per_tok`` of them per token,
    # their softmax weights renormalised over the chosen ones when ``norm_topk_prob``. Other layers keep the dense
    # MLP of ``intermediate_size``.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0   # Qwen2-MoE: a dense SwiGLU expert every token also goes through,
                                               # scaled by sigmoid(shared_expert_gate(x)); 0: none

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in ROPE_TYPES or rope_type == "default":
                raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {sorted(ROPE_TYPES)} "
                                 "(use rope_scaling=None for 'default')")
            missing = [k for k in ROPE_TYPES[rope_type] if self.rope_scaling.get(k) is None]
            if missing:
                raise ValueError(f"rope_scaling of type {rope_type!r} lacks {missing}")
        if not all(isinstance(t, int) and t >= 0 for t in self.eos_token_ids):
            raise ValueError(f"eos_token_ids must be non-negative ints, got {self.eos_token_ids!r}")
        get_architecture(self.architecture)  # raises ValueError listing the supported ones
        if self.moe_layers:
            if not (isinstance(self.num_experts, int) and self.num_experts > 0):
                raise ValueError(f"ModelConfig.num_experts must be a positive int with MoE layers, got "
                                 f"{self.num_experts!r}")
            if not (isinstance(self.num_experts_per_tok, int) and 0 < self.num_experts_per_tok <= self.num_experts):
                raise ValueError(f"ModelConfig.num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                                 f"got {self.num_experts_per_tok!r}")
            if not (isinstance(self.moe_intermediate_size, int) and self.moe_intermediate_size > 0):
                raise ValueError(f"ModelConfig.moe_intermediate_size must be a positive int, got "
                                 f"{self.moe_intermediate_size!r}")
            if any(not 0 <= i < self.num_layers for i in self.moe_layers) or \
                    list(self.moe_layers) != sorted(set(self.moe_layers)):
                raise ValueError(f"ModelConfig.moe_layers must be distinct sorted layer indices < {self.num_layers}, "
                                 f"got {self.moe_layers!r}")

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Read ``path/config.json`` (and ``generation_config.json``'s eos ids when present)."""
        path = Path(path)
        config_file = path / "config.json" if path.is_dir() or not path.suffix else path
        if not config_file.is_file():
            raise ValueError(f"no config.json at {path}")
        from transformers import AutoConfig  # heavy import, kept local

        try:
            hf_config = AutoConfig.from_pretrained(str(config_file.parent))
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"transformers cannot read {config_file}: {e}") from e
        extra_eos = ()
        gen_file = config_file.parent / "generation_config.json"
        if gen_file.is_file():
            extra_eos = _as_id_tuple(json.loads(gen_file.read_text()).get("eos_token_id"))
        return cls.from_hf_config(hf_config, extra_eos_token_ids=extra_eos)

    @classmethod
    def from_hf_config(cls, hf_config: Any, extra_eos_token_ids: tuple[int, ...] = ()) -> "ModelConfig":
        """Translate a transformers ``PretrainedConfig`` (4.x or 5.x attribute layout)."""
        archs = list(getattr(hf_config, "architectures", None) or [])
        known = [a for a in archs if a in supported_architectures()]
        if not known:
            raise ValueError(f"config.json architectures={archs} names no supported architecture; "
                             f"supported: {supported_architectures()}")
        spec = get_architecture(known[0])
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError(f"{spec.name} with mlp_bias=True is not supported")

        max_pos = int(hf_config.max_position_embeddings)
        sliding = getattr(hf_config, "sliding_window", None)
        if getattr(hf_config, "use_sliding_window", True) is False:
            sliding = None
        if sliding is not None and int(sliding) < max_pos:
            raise ValueError(f"sliding-window attention (sliding_window={sliding} < max_position_embeddings="
                             f"{max_pos}) is not supported")

        rope_theta, rope_scaling = _read_rope(hf_config, max_pos)
        num_heads = int(hf_config.num_attention_heads)
        head_dim = getattr(hf_config, "head_dim", None) or int(hf_config.hidden_size) // num_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        eos = _as_id_tuple(getattr(hf_config, "eos_token_id", None))
        eos = eos + tuple(t for t in extra_eos_token_ids if t not in eos)
        dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        moe = _read_moe(hf_config, spec.name) if spec.moe else {}
        return cls(
            architecture=spec.name,
            vocab_size=int(hf_config.vocab_size),
            hidden_size=int(hf_config.hidden_size),
            intermediate_size=int(hf_config.intermediate_size),
            num_layers=int(hf_config.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=int(num_kv_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=attention_bias if spec.qkv_bias is None else spec.qkv_bias,
            o_proj_bias=attention_bias if spec.o_proj_bias is None else spec.o_proj_bias,
            qk_norm=spec.qk_norm,
            eos_token_ids=eos,
            torch_dtype=None if dtype is None else str(dtype).replace("torch.", ""),
            **moe,
        )


def _read_moe(hf_config: Any, arch: str) -> dict:
    """The MoE fields of a Qwen3-MoE / Qwen2-MoE config: which layers are sparse (as transformers decides: not in
    ``mlp_only_layers``, and every ``decoder_sparse_step``-th), the expert counts and sizes, the shared expert's."""
    num_experts = int(getattr(hf_config, "num_experts", 0) or 0)
    step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
    dense = set(getattr(hf_config, "mlp_only_layers", None) or ())
    layers = tuple(i for i in range(int(hf_config.num_hidden_layers))
                   if num_experts > 0 and i not in dense and (i + 1) % step == 0)
    return dict(shared_expert_intermediate_size=int(getattr(hf_config, "shared_expert_intermediate_size", 0) or 0),
                num_experts=num_experts, num_experts_per_tok=int(getattr(hf_config, "num_experts_per_tok", 0) or 0),
                moe_intermediate_size=int(getattr(hf_config, "moe_intermediate_size", 0) or 0),
                norm_topk_prob=bool(getattr(hf_config, "norm_topk_prob", False)), moe_layers=layers)


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _read_rope(hf_config: Any, max_pos: int) -> tuple[float, Optional[dict]]:
    """-> (rope_theta, rope_scaling or None).

    transformers 5 keeps everything in ``rope_parameters`` (rope_theta included); 4.x and classic
    config.json files have a top-level ``rope_theta`` plus ``rope_scaling`` (whose type key may be the
    old ``type``). Read whichever is there.
    """
    params = getattr(hf_config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        params = getattr(hf_config, "rope_scaling", None)
    params = dict(params) if isinstance(params, dict) else {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported")
    theta = params.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None) or 10000.0
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", None) or getattr(hf_config, "partial_rotary_factor", None)
    if partial not in (None, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {sorted(ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), None
    if rope_type in ("llama3", "yarn") and params.get("original_max_position_embeddings") is None:
        # Same fallback as transformers' standardize_rope_params.
        params["original_max_position_embeddings"] = getattr(
            hf_config, "original_max_position_embeddings", None) or max_pos
    return float(theta), {"rope_type": rope_type, **params}

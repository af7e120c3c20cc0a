"""Architecture registry: Hugging Face ``architectures`` name -> how ``ModelConfig`` reads it and which
module serves it.

Adding a decoder-only architecture that the generic ``CausalLM`` can already express is one call::

    register_architecture("MyForCausalLM", qkv_bias=True, qk_norm=False)

An architecture that needs its own module passes ``model_cls`` (a class taking ``(ModelConfig, dtype=...)``
with the same ``forward``/``compute_logits`` interface as ``CausalLM``) and, if its checkpoint names differ,
registers its own weight mapping beside it (see ``engine.weights``).

This module imports nothing heavy so ``engine.model_config`` can use it without an import cycle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ArchitectureSpec:
    """How one Hugging Face architecture maps onto the generic decoder."""

    name: str                   # e.g. "Qwen2ForCausalLM" (an entry of config.json's ``architectures``)
    qkv_bias: Optional[bool]    # bias on q/k/v; None: follow the HF config's ``attention_bias``
    o_proj_bias: Optional[bool] # bias on o_proj; None: follow the HF config's ``attention_bias``
    qk_norm: bool               # per-head RMSNorm on q and k before rotary (Qwen3)
    model_cls: Optional[type]   # None: the generic ``engine.models.decoder.CausalLM``
    moe: bool = False           # sparse MoE layers (router + experts) where the config puts them (Qwen3-MoE)


_ARCHITECTURES: dict[str, ArchitectureSpec] = {}


def register_architecture(
    name: str,
    *,
    qkv_bias: Optional[bool] = None,
    o_proj_bias: Optional[bool] = None,
    qk_norm: bool = False,
    model_cls: Optional[type] = None,
    moe: bool = False,
) -> ArchitectureSpec:
    """Register (or replace) an architecture. Returns the stored spec."""
    spec = ArchitectureSpec(name=name, qkv_bias=qkv_bias, o_proj_bias=o_proj_bias, qk_norm=qk_norm,
                            model_cls=model_cls, moe=moe)
    _ARCHITECTURES[name] = spec
    return spec


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_architecture(name: str) -> ArchitectureSpec:
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {name!r}; supported: {supported_architectures()}") from None


def get_model_class(name: str) -> type:
    spec = get_architecture(name)
    if spec.model_cls is not None:
        return spec.model_cls
    from engine.models.decoder import CausalLM  # lazy: the decoder imports torch modules
    return CausalLM


# Llama and Qwen3 put ``attention_bias`` on q/k/v *and* o_proj; Qwen2 hard-codes bias on q/k/v only.
register_architecture("LlamaForCausalLM", qkv_bias=None, o_proj_bias=None)
register_architecture("MistralForCausalLM", qkv_bias=False, o_proj_bias=False)
register_architecture("Qwen2ForCausalLM", qkv_bias=True, o_proj_bias=False)
register_architecture("Qwen3ForCausalLM", qkv_bias=None, o_proj_bias=None, qk_norm=True)
register_architecture("Qwen3MoeForCausalLM", qkv_bias=None, o_proj_bias=None, qk_norm=True, moe=True)
register_architecture("Qwen2MoeForCausalLM", qkv_bias=True, o_proj_bias=False, moe=True)   # + a shared expert

"""Rotary position embeddings: the inverse frequencies of each rope type (default, linear, llama3, yarn), the
[max_pos, D/2] cos/sin tables, and the rotate-half application, with transformers' ``modeling_rope_utils`` maths.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.model_config import ModelConfig


def rope_inv_freq(config: "ModelConfig") -> tuple[torch.Tensor, float]:
    """-> (inv_freq [D/2] float32 on CPU, attention_factor that scales cos/sin).

    Same maths as transformers' ``modeling_rope_utils`` for each rope type (default, linear, llama3, yarn).
    """
    dim, base = config.head_dim, config.rope_theta
    # NOTE: construct on CPU explicitly: the model may be built under ``torch.device("meta")``.
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    inv_freq = 1.0 / (base ** exponent)
    rs = config.rope_scaling or {"rope_type": "default"}
    rope_type = rs["rope_type"]
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / rs["factor"], 1.0
    if rope_type == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths (low frequency) are slowed by `factor`, short ones kept, the band between blended
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(dim, base, rs, config.max_position_embeddings)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def _yarn_inv_freq(dim: int, base: float, rs: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    orig = rs["original_max_position_embeddings"]
    factor = rs.get("factor") or max_pos / orig

    def mscale_of(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim))
        else:
            attention_factor = mscale_of(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # the rotary dim whose wavelength completes `num_rotations` turns over the original context
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def rope_cos_sin(config: "ModelConfig", device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (cos, sin), each [max_position_embeddings, D/2] float32 (attention_factor folded in).

    Only half of the HF ``cat(freqs, freqs)`` table is stored: both halves are equal.
    """
    inv_freq, attention_factor = rope_inv_freq(config)
    positions = torch.arange(config.max_position_embeddings, dtype=torch.int64, device="cpu").to(torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2], same products as HF's position * inv_freq
    cos, sin = freqs.cos() * attention_factor, freqs.sin() * attention_factor
    return cos.to(device), sin.to(device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF rotate-half convention. x: [T, H, D]; cos/sin: [T, D/2] already in x's dtype.

    out = x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), rotate_half(x) = cat(-x2, x1)
    """
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

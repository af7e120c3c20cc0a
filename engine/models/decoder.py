"""One decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3 family, Qwen3-MoE / Qwen2-MoE) over a flat token
dimension.

Parameters are stored fused so each layer runs two GEMMs where Hugging Face runs five:

    qkv_proj.weight     [(Hq + 2*Hkv) * D, hidden]   rows: q | k | v      (bias when attention_bias)
    gate_up_proj.weight [2 * I, hidden]              rows: gate | up

``engine.weights`` maps Hugging Face checkpoint names onto row slices of these tensors.

Numerics follow transformers so fp32 outputs agree to ~1e-5: RMSNorm in float32 then cast back before the
weight multiply, rotary cos/sin computed in float32 and cast to the activation dtype, attention math in float32
inside the backend, logits returned in float32. ``CausalLM.enable_fp32_head`` moves the final norm and the
lm_head to float32 (``engine.models.fp32_head``: the fix for the bf16 train/inference logprob mismatch).

Two execution paths, chosen per forward by ``CausalLM.use_fused_ops``:
  - torch ops (CPU, the oracle): each layer returns ``residual + branch`` as transformers does;
  - fused Triton ops (CUDA by default): the layer loop carries the residual stream separately, as vLLM does,
    so each RMSNorm also does the residual add (``hidden, residual = norm(hidden, residual)``); SiLU-and-mul
    is one kernel and rotary is applied in place on the fused qkv output. Fewer passes; the same roundings
    except rotary, which computes in fp32 and rounds once (bf16 results differ in the last bit).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.models.fp32_head import Fp32Head
from engine.models.rotary import apply_rotary, rope_cos_sin

_KERNELS: object = None  # engine.kernels once imported; False when triton is unavailable


def fused_kernels():
    """engine.kernels (imports triton) or None when it cannot be imported; imported once."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from engine import kernels
            _KERNELS = kernels
        except ImportError:
            _KERNELS = False
    return _KERNELS or None

if TYPE_CHECKING:
    from engine.model_config import ModelConfig
    from engine.models.invariant_ops import LayerWeights


# --------------------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)


class DecoderLayer(nn.Module):
    def __init__(self, config: "ModelConfig", layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size, self.kv_size = c.q_size, c.kv_size
        self.scale = c.head_dim ** -0.5
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.qkv_proj = nn.Linear(c.hidden_size, c.q_size + 2 * c.kv_size, bias=c.attention_bias, dtype=dtype)
        self.o_proj = nn.Linear(c.q_size, c.hidden_size, bias=c.o_proj_bias, dtype=dtype)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        # the MLP: dense SwiGLU, or a sparse MoE block in the layers the config names (engine.models.moe)
        self.moe = None
        if layer_idx in c.moe_layers:
            from engine.models.moe import SparseMoE
            self.moe = SparseMoE(c, dtype)
        else:
            self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False, dtype=dtype)
            self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False, dtype=dtype)
        # Fused-ops forwards of at most this many tokens use the matrix-vector kernels (0 = never): set
        # per captured batch size by ``engine.cuda_graphs``, which measures both ways (CausalLM.set_gemv_rows).
        self.gemv_rows = 0

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,     # [T, D/2] in hidden's dtype
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        T = hidden.shape[0]
        # attention block (pre-norm, residual)
        residual = hidden
        x = self.input_layernorm(hidden)
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)     # [T, Hq, D]
        k = k.reshape(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)  # [T, Hq, D]
        hidden = residual + self.o_proj(attn.reshape(T, self.q_size))
        # MLP block: down(silu(gate) * up)
        residual = hidden
        x = self.post_attention_layernorm(hidden)
        if self.moe is not None:
            return residual + self.moe(x, slots=meta.slot_mapping)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return residual + self.down_proj(F.silu(gate) * up)

    def invariant_weights(self) -> "LayerWeights":
        """This layer's parameters for ``engine.models.invariant_ops.layer_forward`` (the batch-invariant mode)."""
        from engine.models.invariant_ops import LayerWeights
        if self.moe is not None:
            raise ValueError("batch_invariant does not support mixture-of-experts layers")
        return LayerWeights(
            self.input_layernorm.weight, self.qkv_proj.weight, self.qkv_proj.bias, self.o_proj.weight,
            self.o_proj.bias, self.q_norm.weight if self.q_norm is not None else None,
            self.k_norm.weight if self.k_norm is not None else None, self.post_attention_layernorm.weight,
            self.gate_up_proj.weight, self.down_proj.weight)

    def forward_fused(
        self,
        hidden: torch.Tensor,              # [T, hidden]: the previous layer's MLP output (or the embeddings)
        residual: Optional[torch.Tensor],  # [T, hidden]: the residual stream before ``hidden`` is added; None first
        cos: torch.Tensor,                 # [T, D/2] in hidden's dtype
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
        kernels,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same function as ``forward`` with the residual carried apart: returns (MLP output, residual
        stream before it), whose sum is what ``forward`` returns (the next norm adds them)."""
        T = hidden.shape[0]
        if T <= self.gemv_rows and self.moe is None:
            return self._forward_fused_gemv(hidden, residual, cos, sin, kv_cache, meta, backend, kernels)
        eps = self.input_layernorm.eps
        x, residual = kernels.rms_norm(hidden, self.input_layernorm.weight, eps, residual)
        qkv = self.qkv_proj(x)                                                 # [T, q + 2 kv]
        attn = self._attention(qkv, cos, sin, kv_cache, meta, backend, kernels)
        hidden = self.o_proj(attn.reshape(T, self.q_size))
        x, residual = kernels.rms_norm(hidden, self.post_attention_layernorm.weight,
                                       self.post_attention_layernorm.eps, residual)
        if self.moe is not None:   # SparseMoE: the fused MoE kernels on CUDA, the torch block elsewhere
            return self.moe(x, slots=meta.slot_mapping), residual
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x))), residual

    def _forward_fused_gemv(self, hidden, residual, cos, sin, kv_cache, meta, backend, kernels):
        """``forward_fused`` for a few rows (decode batches up to ``gemv_rows``), with the matrix-vector
        kernels of ``engine.kernels.gemv``: each RMSNorm runs inside the projection after it, SiLU-and-mul
        inside the down projection: 4 launches instead of 7 around the attention."""
        T = hidden.shape[0]
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        qkv, residual = kernels.norm_gemv(hidden, residual, ln1.weight, ln1.eps, self.qkv_proj.weight,
                                          self.qkv_proj.bias)                # [T, q + 2 kv]
        attn = self._attention(qkv, cos, sin, kv_cache, meta, backend, kernels)
        hidden = kernels.gemv(attn.reshape(T, self.q_size), self.o_proj.weight, self.o_proj.bias)
        gate_up, residual = kernels.norm_gemv(hidden, residual, ln2.weight, ln2.eps, self.gate_up_proj.weight)
        return kernels.silu_mul_gemv(gate_up, self.down_proj.weight), residual

    def _attention(self, qkv, cos, sin, kv_cache, meta, backend, kernels) -> torch.Tensor:
        """Fused-ops attention of the qkv projection [T, q + 2 kv] -> [T, Hq, D]."""
        T = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)       # views into qkv: row stride q + 2 kv
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = kernels.rms_norm(q, self.q_norm.weight, self.q_norm.eps)[0]   # new contiguous tensors
            k = kernels.rms_norm(k, self.k_norm.weight, self.k_norm.eps)[0]
        if backend.fuses_rotary:
            return backend.forward_rotary(q, k, v, cos, sin, kv_cache[0], kv_cache[1], meta, self.scale)
        kernels.apply_rotary_(q, k, cos, sin)                                  # in place
        return backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)  # [T, Hq, D]


class CausalLM(nn.Module):
    """Parameter names (what ``engine.weights`` targets)::

        embed_tokens.weight, norm.weight, lm_head.weight (the embedding Parameter itself when tied)
        layers.{i}.{input_layernorm,post_attention_layernorm}.weight
        layers.{i}.qkv_proj.{weight,bias}, layers.{i}.o_proj.{weight,bias}
        layers.{i}.{q_norm,k_norm}.weight (qk_norm only), layers.{i}.{gate_up_proj,down_proj}.weight
        layers.{i}.moe.{router.weight,gate_up,down} (MoE layers, in place of gate_up_proj/down_proj: engine.models.moe)
    """

    def __init__(self, config: "ModelConfig", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        # NOTE: its own weight, initialised here only off the meta device (load_model builds on meta): a normal_
        # on meta goes through torch._refs, whose first use imports torch._dynamo (2.2 s in every new process)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size, dtype=dtype))
        if not self.embed_tokens.weight.is_meta:
            nn.init.normal_(self.embed_tokens.weight)   # what nn.Embedding does when it makes its weight
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self.tie_weights()
        # Rotary tables: [max_pos, D/2] float32, indexed by position. Not weights (not in state_dict).
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_rope_cache()
        # None: fused Triton ops on CUDA when triton imports, torch ops elsewhere; True / False forces
        # (True on CPU runs the kernels under TRITON_INTERPRET=1: tests only).
        self.use_fused_ops: Optional[bool] = None
        # Set by ``enable_fp32_head``: the final norm and the lm_head in float32 (engine.models.fp32_head).
        self.fp32_head: Optional[Fp32Head] = None
        # Set by the engine in batch-invariant mode (EngineConfig.batch_invariant): every forward and
        # compute_logits runs these ops (engine.models.invariant_ops), whatever use_fused_ops says.
        self.invariant_ops = None

    def _kernels_for(self, device: torch.device):
        if self.use_fused_ops is False or (self.use_fused_ops is None and device.type != "cuda"):
            return None
        kernels = fused_kernels()
        if kernels is None and self.use_fused_ops:
            raise RuntimeError("use_fused_ops=True but engine.kernels (triton) cannot be imported")
        return kernels

    def set_gemv_rows(self, rows: int) -> None:
        """Fused-ops forwards of at most ``rows`` tokens run the matrix-vector kernels (0: never); capped at
        what the kernels take (``engine.kernels.gemv.MAX_ROWS``)."""
        if rows:
            from engine.kernels.gemv import MAX_ROWS
            rows = min(rows, MAX_ROWS)
        for layer in self.layers:
            layer.gemv_rows = rows

    def tie_weights(self) -> None:
        """Make lm_head use embed_tokens' Parameter when tied (one tensor, two names).

        NOTE: ``to_empty`` from the meta device creates new Parameter objects and so unties them; call this
        again after it (``load_model`` does)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def enable_fp32_head(self, materialize: Optional[Callable[[nn.Module], bool]] = None) -> None:
        """From now on the final norm and the lm_head run in float32 over float32 copies of their weights
        (``forward`` returns float32 hidden states): allocates the copies and fills them. ``materialize``: gives
        the copies, built on the meta device, their storage (as ``engine.weights.load_model`` takes it; False
        from it: allocated on the embedding's device)."""
        c = self.config
        device = self.embed_tokens.weight.device
        head = None
        if materialize is not None:
            head = Fp32Head(c.vocab_size, c.hidden_size, c.rms_norm_eps, torch.device("meta"))
            if not materialize(head):
                head = None
        self.fp32_head = head if head is not None else Fp32Head(c.vocab_size, c.hidden_size, c.rms_norm_eps, device)
        self.refresh_fp32_head()

    def refresh_fp32_head(self) -> None:
        """Rewrite the float32 copies from the current parameters, in place (no-op without the fp32 head).
        Whoever writes ``norm.weight``, ``lm_head.weight`` or a tied embedding calls this after."""
        if self.fp32_head is not None:
            self.fp32_head.refresh(self.norm.weight, self.lm_head.weight)

    def init_rope_cache(self, device: Optional[torch.device] = None) -> None:
        """(Re)compute the rotary tables; call after ``to_empty`` (meta-device construction)."""
        if device is None:
            device = self.embed_tokens.weight.device
        cos, sin = rope_cos_sin(self.config, device)
        self.rope_cos, self.rope_sin = cos, sin

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64, position of each token within its sequence
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # one (k_cache, v_cache) per layer
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:            # [T, hidden], after the final norm (float32 with the fp32 head)
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} (k_cache, v_cache) pairs, got {len(kv_caches)}")
        hidden = self.embed_tokens(input_ids)
        cos = self.rope_cos[positions].to(hidden.dtype)  # [T, D/2]
        sin = self.rope_sin[positions].to(hidden.dtype)
        if self.invariant_ops is not None:
            return self._forward_invariant(hidden, cos, sin, kv_caches, meta, self.invariant_ops)
        kernels = self._kernels_for(hidden.device)
        if kernels is not None:
            residual = None
            for layer, kv_cache in zip(self.layers, kv_caches):
                hidden, residual = layer.forward_fused(hidden, residual, cos, sin, kv_cache, meta, backend, kernels)
            if self.fp32_head is not None:
                return self.fp32_head.norm_fused(hidden, residual, kernels)
            return kernels.rms_norm(hidden, self.norm.weight, self.norm.eps, residual)[0]
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(hidden, cos, sin, kv_cache, meta, backend)
        return self.norm(hidden) if self.fp32_head is None else self.fp32_head.norm(hidden)

    def _forward_invariant(self, hidden, cos, sin, kv_caches, meta, ops) -> torch.Tensor:
        """The batch-invariant forward (``engine.models.invariant_ops``): the same layer function as a trainer's
        ``InvariantPolicy``, over the paged cache."""
        from engine.models.invariant_ops import layer_forward

        scale = self.config.head_dim ** -0.5
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            hidden = layer_forward(
                hidden, layer.invariant_weights(), self.config, ops,
                lambda q, k, v: ops.attention(q, k, v, cos, sin, k_cache, v_cache, meta, scale))
        if self.fp32_head is not None:
            return ops.rms_norm(hidden, self.fp32_head.norm_weight, self.fp32_head.eps, upcast=True)
        return ops.rms_norm(hidden, self.norm.weight, self.norm.eps)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """hidden: [R, hidden] (the rows to sample from, as ``forward`` returns them) -> [R, vocab] float32
        (the weights' dtype when ``upcast`` is False: for kernels that read it directly; float32 either way
        with the fp32 head or in batch-invariant mode, whose product rounds once, from its fp32 accumulator)."""
        if self.invariant_ops is not None:
            weight = self.fp32_head.lm_head_weight if self.fp32_head is not None else self.lm_head.weight
            return self.invariant_ops.linear(hidden, weight, out_dtype=torch.float32)
        if self.fp32_head is not None:
            return self.fp32_head.logits(hidden)
        logits = F.linear(hidden, self.lm_head.weight)
        return logits.float() if upcast else logits

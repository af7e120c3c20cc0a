"""The trainer's side of the batch-invariant mode: a causal LM whose forward over whole trajectories returns the
per-token logprobs a ``batch_invariant=True`` engine returned for the same tokens and weights, bitwise, with a
backward so PPO trains with it (gradients are ordinary autograd math, not bitwise anything).

    policy = InvariantPolicy(AutoModelForCausalLM.from_pretrained(path), compute_dtype=torch.bfloat16)
    lp = policy.token_logprobs(batch, temperature)        # [B, L-1], as rollout.rl.token_logprobs returns

It wraps a transformers Llama / Mistral / Qwen2 / Qwen3 model and keeps its modules under their own names
(``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``): the optimizer, ``named_parameters`` for the
weight push and ``state_dict`` see the Hugging Face parameters (fp32 master weights, say). Each forward casts
them to ``compute_dtype`` (the engine's dtype: the cast the weight push does, round to nearest even) and fuses
them as the engine stores them (rows q | k | v, gate | up: concatenation is exact), then runs the same layer
function over the same ops as the engine (``engine.models.invariant_ops``): Triton kernels on CUDA, row-wise
torch on CPU. Attention reads the trajectory's K/V through the same paged kernel, from a scratch cache holding
each trajectory in its own blocks, so every token sees its prefix in the same tiles as in the engine.

Backward: each op is a ``torch.autograd.Function`` whose backward recomputes a plain torch version of the op
(``engine.models.invariant_ops.reference_*``, ``_reference_*`` below) under autograd, or for the matmul uses the
usual two products.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import build_metadata
from engine.model_config import ModelConfig
from engine.models.rotary import apply_rotary, rope_cos_sin
from engine.models.invariant_ops import (InvariantOps, LayerWeights, invariant_ops_for, layer_forward,
                                         reference_rms_norm, reference_silu_mul)


# --------------------------------------------------------------------------------------- torch references
def _reference_attention(q, k, v, cos, sin, lengths, scale):
    """Rotary, then dense causal attention of each packed sequence in float32 -> [T, Hq, D] in q's dtype."""
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_heads // num_kv_heads
    outs, start = [], 0
    for n in lengths:
        qq = q[start:start + n].float().transpose(0, 1)                                   # [Hq, n, D]
        kk = k[start:start + n].float().transpose(0, 1).repeat_interleave(group, dim=0)   # [Hq, n, D]
        vv = v[start:start + n].float().transpose(0, 1).repeat_interleave(group, dim=0)
        scores = (qq @ kk.transpose(1, 2)) * scale
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        outs.append((probs @ vv).transpose(0, 1).to(q.dtype))
        start += n
    return torch.cat(outs)


def _reference_logprobs(logits, tokens, temperatures):
    lp = torch.log_softmax(logits.float() / temperatures[:, None], dim=-1)
    return lp.gather(1, tokens[:, None]).squeeze(1)


class _Recompute(torch.autograd.Function):
    """y = fast(*tensors) forward; backward differentiates slow(*tensors) (the same function in torch ops)."""

    @staticmethod
    def forward(ctx, fast, slow, *tensors):
        ctx.slow = slow
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return fast(*tensors)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in saved]
        wanted = [t for t in inputs if t.requires_grad]
        with torch.enable_grad():
            out = ctx.slow(*inputs)
            outs = out if isinstance(out, tuple) else (out,)
            got = torch.autograd.grad(outs, wanted, grads, allow_unused=True) if wanted else ()
        it = iter(got)
        return (None, None, *[next(it) if t.requires_grad else None for t in inputs])


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, x, weight, bias, out_dtype):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        with torch.no_grad():
            return ops.linear(x, weight, bias, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.to(weight.dtype)
        gx = g @ weight if ctx.needs_input_grad[1] else None
        gw = g.t() @ x if ctx.needs_input_grad[2] else None
        gb = grad.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return None, gx, gw, gb, None


class DifferentiableOps:
    """``InvariantOps`` whose forward is the wrapped ops' (bitwise) and whose backward is torch's."""

    def __init__(self, ops: InvariantOps) -> None:
        self.ops = ops
        self.name = ops.name

    def linear(self, x, weight, bias=None, out_dtype=None):
        return _Linear.apply(self.ops, x, weight, bias, out_dtype)

    def rms_norm(self, x, weight, eps, upcast=False):
        return _Recompute.apply(lambda a, w: self.ops.rms_norm(a, w, eps, upcast),
                                lambda a, w: reference_rms_norm(a, w, eps, upcast), x, weight)

    def silu_mul(self, gate_up):
        return _Recompute.apply(self.ops.silu_mul, reference_silu_mul, gate_up)

    def logprobs(self, logits, tokens, temperatures):
        return _Recompute.apply(self.ops.logprobs, _reference_logprobs, logits, tokens, temperatures)


class InvariantPolicy(nn.Module):
    """A transformers causal LM, trained as usual, whose logprobs are the batch-invariant engine's (see the module
    docstring). ``block_size``: the scratch cache's block (any: the kernels tile by absolute position)."""

    def __init__(self, hf_model: nn.Module, compute_dtype: torch.dtype = torch.float32, *,
                 fp32_lm_head: bool = False, block_size: int = 16, ops: Optional[InvariantOps] = None) -> None:
        super().__init__()
        if not hasattr(hf_model, "model") or not hasattr(hf_model, "lm_head"):
            raise TypeError(f"InvariantPolicy wraps a transformers causal LM (with .model and .lm_head), got "
                            f"{type(hf_model).__name__}")
        self.config = hf_model.config
        self.model_config = ModelConfig.from_hf_config(hf_model.config)
        if self.model_config.architecture not in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                                  "Qwen3ForCausalLM"):
            raise ValueError(f"InvariantPolicy: unsupported architecture {self.model_config.architecture!r}")
        # the wrapped model's own modules under their own names: parameters and state_dict keep HF names
        self.model = hf_model.model
        self.lm_head = hf_model.lm_head
        self.compute_dtype = compute_dtype
        self.fp32_lm_head = fp32_lm_head and compute_dtype != torch.float32   # as EngineConfig.fp32_head_in_effect
        self.block_size = block_size
        self._ops = ops
        self._rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def ops_for(self, device: torch.device) -> DifferentiableOps:
        return DifferentiableOps(self._ops if self._ops is not None else invariant_ops_for(device))

    def _layer_weights(self, layer: nn.Module) -> LayerWeights:
        dt = self.compute_dtype
        att, mlp = layer.self_attn, layer.mlp
        bias = None
        if att.q_proj.bias is not None:
            bias = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]).to(dt)
        q_norm = getattr(att, "q_norm", None)
        k_norm = getattr(att, "k_norm", None)
        return LayerWeights(
            input_norm=layer.input_layernorm.weight.to(dt),
            qkv=torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).to(dt),
            qkv_bias=bias,
            o=att.o_proj.weight.to(dt), o_bias=att.o_proj.bias.to(dt) if att.o_proj.bias is not None else None,
            q_norm=q_norm.weight.to(dt) if q_norm is not None else None,
            k_norm=k_norm.weight.to(dt) if k_norm is not None else None,
            post_norm=layer.post_attention_layernorm.weight.to(dt),
            gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).to(dt),
            down=mlp.down_proj.weight.to(dt))

    def _rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].device != device:
            self._rope = rope_cos_sin(self.model_config, device)
        return self._rope

    def hidden_states(self, sequences: list[list[int]] | list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The final-norm output of every token of each sequence, packed: [sum(len), H] (float32 with
        ``fp32_lm_head``, else the compute dtype), differentiable."""
        mc, dt = self.model_config, self.compute_dtype
        lengths = [len(s) for s in sequences]
        if not lengths or min(lengths) < 1:
            raise ValueError(f"hidden_states needs non-empty sequences, got lengths {lengths}")
        ids = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in sequences]).to(device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
        if int(positions.max()) >= mc.max_position_embeddings:
            raise ValueError(f"a sequence of {max(lengths)} tokens is longer than the model's "
                             f"{mc.max_position_embeddings} positions")
        ops = self.ops_for(device)
        bs = self.block_size
        tables, first = [], 0
        for n in lengths:        # each sequence in its own run of blocks of the scratch cache
            blocks = -(-n // bs)
            tables.append(list(range(first, first + blocks)))
            first += blocks
        meta = build_metadata(lengths, lengths, tables, bs, device)
        cache_shape = (first, bs, mc.num_kv_heads, mc.head_dim)
        cos_t, sin_t = self._rope_tables(device)
        cos, sin = cos_t[positions].to(dt), sin_t[positions].to(dt)                      # [T, D/2]
        scale = mc.head_dim ** -0.5

        def attend(q, k, v):
            def fast(q, k, v, cos, sin):
                k_cache = torch.zeros(cache_shape, dtype=k.dtype, device=device)
                v_cache = torch.zeros(cache_shape, dtype=v.dtype, device=device)
                return ops.ops.attention(q.clone(), k.clone(), v, cos, sin, k_cache, v_cache, meta, scale)
            return _Recompute.apply(fast, lambda q, k, v, c, s: _reference_attention(q, k, v, c, s, lengths, scale),
                                    q, k, v, cos, sin)

        hidden = F.embedding(ids, self.model.embed_tokens.weight.to(dt))                   # [T, H]
        for layer in self.model.layers:
            hidden = layer_forward(hidden, self._layer_weights(layer), mc, ops, attend)
        norm_w = self.model.norm.weight.to(dt)
        if self.fp32_lm_head:    # the engine's float32 copies are its (compute-dtype) weights upcast
            return ops.rms_norm(hidden, norm_w.float(), mc.rms_norm_eps, upcast=True)
        return ops.rms_norm(hidden, norm_w, mc.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden rows [R, H] (from ``hidden_states``) -> [R, V] float32, as the engine's compute_logits."""
        weight = self.lm_head.weight.to(self.compute_dtype)
        if self.fp32_lm_head:
            weight = weight.float()
        return self.ops_for(hidden.device).linear(hidden, weight, out_dtype=torch.float32)

    def sequence_logprobs(self, sequences: list[list[int]], temperature: float = 1.0,
                          device: torch.device | str | None = None) -> list[torch.Tensor]:
        """log_softmax(logits / T) of every token after the first of each sequence: [len - 1] each."""
        device = torch.device(device) if device is not None else self.lm_head.weight.device
        hidden = self.hidden_states(sequences, device)
        lengths = [len(s) for s in sequences]
        rows = torch.cat([torch.arange(n - 1) + sum(lengths[:i]) for i, n in enumerate(lengths)]).to(device)
        targets = torch.cat([torch.as_tensor(s[1:], dtype=torch.long) for s in sequences]).to(device)
        lp = self._pick(hidden.index_select(0, rows), targets, temperature)
        return list(lp.split([n - 1 for n in lengths]))

    def _pick(self, hidden_rows, targets, temperature):
        temps = torch.full((targets.shape[0],), float(temperature), dtype=torch.float32, device=targets.device)
        return self.ops_for(hidden_rows.device).logprobs(self.logits(hidden_rows), targets, temps)

    def token_logprobs(self, batch, temperature: float) -> torch.Tensor:
        """``rollout.rl.token_logprobs`` for this policy: [B, L-1], filled where ``batch.loss_mask`` is 1. Only the
        model-token rows go through the lm_head (their results do not depend on which rows go)."""
        device = batch.input_ids.device
        lengths = batch.attention_mask.sum(1).tolist()
        sequences = [batch.input_ids[i, :n] for i, n in enumerate(lengths)]
        hidden = self.hidden_states(sequences, device)                               # [sum(len), H]
        mask = batch.loss_mask.bool()                                                # [B, L-1]
        # packed row of position t of sequence i: starts[i] + t (t < len_i - 1 wherever the mask is set)
        starts = torch.tensor([0] + lengths[:-1], device=device).cumsum(0)
        b, t = mask.nonzero(as_tuple=True)
        picked = self._pick(hidden.index_select(0, starts[b] + t), batch.targets[b, t], temperature)
        out = torch.zeros(mask.shape, dtype=picked.dtype, device=device)
        return out.index_put((b, t), picked)


__all__ = ["DifferentiableOps", "InvariantPolicy"]

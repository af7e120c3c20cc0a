"""Hugging Face checkpoint names -> the decoder's fused parameters, and loading.

Mapping (layer i; D = head_dim, Hq/Hkv = heads, I = intermediate_size)::

    model.layers.{i}.self_attn.q_proj.{weight,bias} -> layers.{i}.qkv_proj rows [0, Hq*D)
    model.layers.{i}.self_attn.k_proj.{weight,bias} -> layers.{i}.qkv_proj rows [Hq*D, (Hq+Hkv)*D)
    model.layers.{i}.self_attn.v_proj.{weight,bias} -> layers.{i}.qkv_proj rows [(Hq+Hkv)*D, (Hq+2*Hkv)*D)
    model.layers.{i}.mlp.gate_proj.weight           -> layers.{i}.gate_up_proj rows [0, I)
    model.layers.{i}.mlp.up_proj.weight             -> layers.{i}.gate_up_proj rows [I, 2*I)
    MoE layers (Qwen3-MoE, Qwen2-MoE; E experts of intermediate size I, engine.models.moe):
    model.layers.{i}.mlp.gate.weight                -> layers.{i}.moe.router.weight
    model.layers.{i}.mlp.experts.{e}.gate_proj.weight -> layers.{i}.moe.gate_up[e, 0:I]
    model.layers.{i}.mlp.experts.{e}.up_proj.weight -> layers.{i}.moe.gate_up[e, I:2I]
    model.layers.{i}.mlp.experts.{e}.down_proj.weight -> layers.{i}.moe.down[e]
    model.layers.{i}.mlp.experts.gate_up_proj       -> layers.{i}.moe.gate_up, whole (transformers 5's in-memory
    model.layers.{i}.mlp.experts.down_proj          -> layers.{i}.moe.down, whole   name: what its trainer pushes;
                                                       an alias covering the per-expert names above)
    model.layers.{i}.mlp.shared_expert.{gate,up}_proj.weight -> layers.{i}.moe.shared_gate_up rows (Qwen2-MoE)
    model.layers.{i}.mlp.shared_expert.down_proj.weight / shared_expert_gate.weight -> moe.shared_down / ..._gate
    everything else                                 -> the parameter of the same role, whole
    lm_head.weight                                  -> absent when tied (ignored if a checkpoint has it anyway)
    *.rotary_emb.inv_freq                           -> ignored (recomputed)

Resolving and validating a name/shape (``WeightMapper.check``) is separate from writing it
(``copy_into``), so an atomic live update can validate a whole manifest before any byte lands.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple, Optional

import torch
from torch import nn

from engine.model_config import ModelConfig

if TYPE_CHECKING:
    from engine.models.decoder import CausalLM

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightTarget(NamedTuple):
    """Where one checkpoint tensor lands: ``param[shard]`` (rows along dim 0, or an index such as (expert, rows)
    into a 3-D expert tensor: always a contiguous view), or the whole param."""

    param_name: str
    shard: Optional[object]


class WeightMapper:
    """Pure name/shape logic for one ``ModelConfig``; never touches tensors' data."""

    def __init__(self, model_config: ModelConfig) -> None:
        c = self.config = model_config
        q, kv, inter = c.q_size, c.kv_size, c.intermediate_size
        # layer-local HF suffix -> (our layer-local name, rows or None, HF tensor shape)
        local: dict[str, tuple[str, Optional[slice], tuple[int, ...]]] = {
            "input_layernorm.weight": ("input_layernorm.weight", None, (c.hidden_size,)),
            "post_attention_layernorm.weight": ("post_attention_layernorm.weight", None, (c.hidden_size,)),
            "self_attn.q_proj.weight": ("qkv_proj.weight", slice(0, q), (q, c.hidden_size)),
            "self_attn.k_proj.weight": ("qkv_proj.weight", slice(q, q + kv), (kv, c.hidden_size)),
            "self_attn.v_proj.weight": ("qkv_proj.weight", slice(q + kv, q + 2 * kv), (kv, c.hidden_size)),
            "self_attn.o_proj.weight": ("o_proj.weight", None, (c.hidden_size, q)),
            "mlp.gate_proj.weight": ("gate_up_proj.weight", slice(0, inter), (inter, c.hidden_size)),
            "mlp.up_proj.weight": ("gate_up_proj.weight", slice(inter, 2 * inter), (inter, c.hidden_size)),
            "mlp.down_proj.weight": ("down_proj.weight", None, (c.hidden_size, inter)),
        }
        if c.attention_bias:
            local["self_attn.q_proj.bias"] = ("qkv_proj.bias", slice(0, q), (q,))
            local["self_attn.k_proj.bias"] = ("qkv_proj.bias", slice(q, q + kv), (kv,))
            local["self_attn.v_proj.bias"] = ("qkv_proj.bias", slice(q + kv, q + 2 * kv), (kv,))
        if c.o_proj_bias:
            local["self_attn.o_proj.bias"] = ("o_proj.bias", None, (c.hidden_size,))
        if c.qk_norm:
            local["self_attn.q_norm.weight"] = ("q_norm.weight", None, (c.head_dim,))
            local["self_attn.k_norm.weight"] = ("k_norm.weight", None, (c.head_dim,))
        self._layer_local = local
        # MoE layers: the attention and norms as above, the router and experts in place of the dense MLP; the
        # fused transformers-5 names are aliases, each covering a set of the per-expert (checkpoint) names
        self._moe_local: dict[str, tuple[str, Optional[object], tuple[int, ...]]] = {}
        self._moe_aliases: dict[str, tuple[tuple[str, Optional[object], tuple[int, ...]], list[str]]] = {}
        if c.is_moe:
            experts, mi = c.num_experts, c.moe_intermediate_size
            moe = {k: v for k, v in local.items() if not k.startswith("mlp.")}
            moe["mlp.gate.weight"] = ("moe.router.weight", None, (experts, c.hidden_size))
            for e in range(experts):
                moe[f"mlp.experts.{e}.gate_proj.weight"] = ("moe.gate_up", (e, slice(0, mi)), (mi, c.hidden_size))
                moe[f"mlp.experts.{e}.up_proj.weight"] = ("moe.gate_up", (e, slice(mi, 2 * mi)), (mi, c.hidden_size))
                moe[f"mlp.experts.{e}.down_proj.weight"] = ("moe.down", e, (c.hidden_size, mi))
            if c.shared_expert_intermediate_size:
                si = c.shared_expert_intermediate_size
                moe["mlp.shared_expert.gate_proj.weight"] = ("moe.shared_gate_up.weight", slice(0, si), (si, c.hidden_size))
                moe["mlp.shared_expert.up_proj.weight"] = ("moe.shared_gate_up.weight", slice(si, 2 * si),
                                                           (si, c.hidden_size))
                moe["mlp.shared_expert.down_proj.weight"] = ("moe.shared_down.weight", None, (c.hidden_size, si))
                moe["mlp.shared_expert_gate.weight"] = ("moe.shared_expert_gate.weight", None, (1, c.hidden_size))
            self._moe_local = moe
            self._moe_aliases = {
                "mlp.experts.gate_up_proj": (("moe.gate_up", None, (experts, 2 * mi, c.hidden_size)),
                                             [f"mlp.experts.{e}.{w}_proj.weight" for e in range(experts)
                                              for w in ("gate", "up")]),
                "mlp.experts.down_proj": (("moe.down", None, (experts, c.hidden_size, mi)),
                                          [f"mlp.experts.{e}.down_proj.weight" for e in range(experts)]),
            }
        self._moe_layers = frozenset(c.moe_layers)
        self._global: dict[str, tuple[str, Optional[slice], tuple[int, ...]]] = {
            "model.embed_tokens.weight": ("embed_tokens.weight", None, (c.vocab_size, c.hidden_size)),
            "model.norm.weight": ("norm.weight", None, (c.hidden_size,)),
        }
        if not c.tie_word_embeddings:
            self._global["lm_head.weight"] = ("lm_head.weight", None, (c.vocab_size, c.hidden_size))

    def _lookup(self, hf_name: str) -> Optional[tuple[str, Optional[slice], tuple[int, ...]]]:
        if hf_name in self._global:
            return self._global[hf_name]
        m = _LAYER_RE.match(hf_name)
        if m is None or int(m.group(1)) >= self.config.num_layers:
            return None
        i, suffix = int(m.group(1)), m.group(2)
        if i in self._moe_layers:
            entry = self._moe_local.get(suffix) or (self._moe_aliases[suffix][0] if suffix in self._moe_aliases
                                                    else None)
        else:
            entry = self._layer_local.get(suffix)
        if entry is None:
            return None
        name, shard, shape = entry
        return f"layers.{i}.{name}", shard, shape

    def _local(self, layer: int) -> dict:
        return self._moe_local if layer in self._moe_layers else self._layer_local

    @staticmethod
    def is_ignored(hf_name: str, tie_word_embeddings: bool) -> bool:
        return hf_name.endswith(_IGNORED_SUFFIXES) or (tie_word_embeddings and hf_name == "lm_head.weight")

    def resolve(self, hf_name: str) -> Optional[WeightTarget]:
        """-> target, or None for a name that is deliberately ignored. Unknown name -> ValueError."""
        entry = self._lookup(hf_name)
        if entry is not None:
            return WeightTarget(entry[0], entry[1])
        if self.is_ignored(hf_name, self.config.tie_word_embeddings):
            return None
        raise ValueError(f"unknown weight {hf_name!r} for {self.config.architecture}")

    def check(self, hf_name: str, tensor: torch.Tensor) -> Optional[WeightTarget]:
        """``resolve`` plus shape and dtype checks; raises ValueError naming the tensor."""
        target = self.resolve(hf_name)
        if target is None:
            return None
        expected = self._lookup(hf_name)[2]
        if tuple(tensor.shape) != expected:
            raise ValueError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {expected}")
        if not tensor.is_floating_point():
            raise ValueError(f"weight {hf_name!r} has non-floating dtype {tensor.dtype}")
        return target

    def expected_hf_names(self) -> dict[str, tuple[int, ...]]:
        """Every checkpoint name a complete checkpoint must carry -> its shape."""
        out = {name: shape for name, (_, _, shape) in self._global.items()}
        for i in range(self.config.num_layers):
            for suffix, (_, _, shape) in self._local(i).items():
                out[f"model.layers.{i}.{suffix}"] = shape
        return out

    def shape_of(self, hf_name: str) -> Optional[tuple[int, ...]]:
        """The shape an accepted name (a checkpoint name or an alias) must have; None for an unknown one."""
        entry = self._lookup(hf_name)
        return None if entry is None else entry[2]

    def covered(self, names: Iterable[str]) -> set[str]:
        """The expected (checkpoint) names that ``names`` write: themselves, and for an alias the names it covers."""
        out: set[str] = set()
        for name in names:
            m = _LAYER_RE.match(name)
            if m is not None and int(m.group(1)) in self._moe_layers and m.group(2) in self._moe_aliases:
                out.update(f"model.layers.{m.group(1)}.{s}" for s in self._moe_aliases[m.group(2)][1])
            else:
                out.add(name)
        return out

    def missing(self, seen: Iterable[str]) -> list[str]:
        """Expected names absent from ``seen`` (aliases expanded), sorted."""
        return sorted(set(self.expected_hf_names()) - self.covered(seen))


def copy_into(params: dict[str, nn.Parameter], target: WeightTarget, tensor: torch.Tensor) -> None:
    """Write one validated tensor in place (dtype cast, cross-device copy); never reallocates."""
    dst = params[target.param_name].data
    if target.shard is not None:
        dst = dst[target.shard]
    dst.copy_(tensor)


def load_weights(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> list[str]:
    """Stream ``(hf_name, tensor)`` pairs into ``model`` (a ``CausalLM``) in place.

    Each tensor is validated before it is written, but tensors are written as they arrive (right for the
    initial load, where a failure discards the model). Live updates that must be all-or-nothing validate
    the whole manifest with ``WeightMapper.check``/``missing`` first. Returns the names loaded.
    Raises ValueError on an unknown name, a wrong shape, a repeated name, or (strict) missing names.
    """
    mapper = WeightMapper(model.config)
    params = dict(model.named_parameters())
    seen: list[str] = []
    seen_set: set[str] = set()
    with torch.no_grad():
        for name, tensor in named_tensors:
            target = mapper.check(name, tensor)
            if target is None:
                continue
            if name in seen_set:
                raise ValueError(f"weight {name!r} given twice")
            copy_into(params, target, tensor)
            seen.append(name)
            seen_set.add(name)
    if strict:
        missing = mapper.missing(seen_set)
        if missing:
            shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint lacks weights: {shown}")
    return seen


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint: a single file, a sharded directory (index json), or a directory
    with ``model.safetensors`` (or other ``*.safetensors`` files)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [path / f for f in sorted(set(weight_map.values()))]
            absent = [str(f) for f in files if not f.is_file()]
            if absent:
                raise ValueError(f"{index} names missing shard files: {absent}")
            return files
        single = path / "model.safetensors"
        if single.is_file():
            return [single]
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
    raise ValueError(f"no safetensors weights at {path}")


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, cpu tensor)`` for every tensor of the checkpoint at ``path``, file by file."""
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device | str,
               random_weights: bool = False,
               materialize: Optional[Callable[[nn.Module], bool]] = None) -> tuple["CausalLM", ModelConfig]:
    """Build the model for ``path/config.json`` without initialising weights, then load the checkpoint.

    ``random_weights``: no checkpoint is read; weights are drawn N(0, 0.02) (norms 1) from a fixed
    seed. For benchmarks of real shapes from a bare config.json (vLLM's ``load_format="dummy"``).
    ``materialize``: gives the model, built on the meta device, its storage on ``device`` instead of
    ``to_empty`` (e.g. at fixed addresses: ``engine.device_memory.FixedAddresses.materialize``); False from it:
    ``to_empty`` after all."""
    from engine.models.registry import get_model_class

    config = ModelConfig.from_pretrained(path)
    if not random_weights:
        safetensors_files(path)  # fail on a missing checkpoint before allocating anything
    with torch.device("meta"):
        model = get_model_class(config.architecture)(config, dtype=dtype)
    if materialize is None or not materialize(model):
        # What model.to_empty(device=device) does, with torch.empty: empty_like of a meta tensor runs torch._refs,
        # whose first use imports sympy (0.6 s in every new process). A tied lm_head keeps sharing embed_tokens'
        # Parameter (its data is replaced in place).
        model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    model.tie_weights()
    model.init_rope_cache()
    if random_weights:
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=gen)
    else:
        load_weights(model, iter_safetensors(path), strict=True)
    model.eval().requires_grad_(False)
    return model, config

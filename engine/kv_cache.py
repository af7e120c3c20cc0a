"""Paged KV-cache tensors: one (k_cache, v_cache) pair per layer, each

    [num_blocks, block_size, num_kv_heads, head_dim]

Block ids index dim 0; the scheduler's ``BlockPool`` owns which ids are free. A token's flat slot is
``block_id * block_size + offset`` (see ``engine.attention.base``).
"""
from __future__ import annotations

import math
import mmap

import torch

from engine.model_config import ModelConfig


def kv_bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V together."""
    element_size = torch.empty((), dtype=dtype).element_size()
    per_layer = block_size * model_config.num_kv_heads * model_config.head_dim * element_size
    return 2 * model_config.num_layers * per_layer


def kv_cache_shape(model_config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """``[2 * num_layers, num_blocks, block_size, Hkv, D]``: the one tensor every layer's K and V are views of."""
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
    return (2 * model_config.num_layers, num_blocks, block_size, model_config.num_kv_heads, model_config.head_dim)


def allocate_kv_cache(
    model_config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    storage: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zero-filled caches (zeros, not empty: kernels that read a padded tail never see NaN garbage).

    All layers live in one tensor ``[2 * num_layers, num_blocks, block_size, Hkv, D]`` (layer i's K is row 2i,
    its V row 2i + 1), each a contiguous view, so a block of every layer moves with one indexing kernel
    (``kv_storage``; host offload) while every kernel still sees per-layer tensors. ``storage``: that tensor,
    allocated by the caller (zeroed here; e.g. at fixed addresses, ``engine.device_memory``); default a new one."""
    shape = kv_cache_shape(model_config, num_blocks, block_size)
    if storage is None:
        storage = (_lazy_host_zeros(shape, dtype) if torch.device(device).type == "cpu"
                   else torch.zeros(shape, dtype=dtype, device=device))
    else:
        if tuple(storage.shape) != shape or storage.dtype != dtype or not storage.is_contiguous() \
                or storage._base is not None:
            raise ValueError(f"KV storage must be a contiguous base tensor {shape} {dtype}, got "
                             f"{tuple(storage.shape)} {storage.dtype}")
        storage.zero_()
    return [(storage[2 * i], storage[2 * i + 1]) for i in range(model_config.num_layers)]


def _lazy_host_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor in anonymous memory, whose pages the kernel maps (zeroed) on first write:
    ``torch.zeros`` writes every byte up front (2.3 s and all of it resident for the 1 GiB default CPU cache,
    most of which a CPU engine never touches). The tensor owns its memory: unmapped when the last view goes."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    flat = torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)
    return torch.empty(0, dtype=dtype).set_(flat.untyped_storage(), 0, shape)


def kv_storage(kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """The ``[2L, num_blocks, ...]`` tensor the caches are consecutive views of (``allocate_kv_cache``), or
    None for caches allocated otherwise."""
    layers = [c for pair in kv_caches for c in pair]
    base = layers[0]._base
    if base is None or base.dim() != layers[0].dim() + 1 or base.shape[0] != len(layers):
        return None
    step = base.stride(0) * base.element_size()
    if any(c._base is not base or c.data_ptr() != base.data_ptr() + i * step for i, c in enumerate(layers)):
        return None
    return base

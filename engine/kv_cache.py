"""Paged KV-cache tensors: one (k_cache, v_cache) pair per layer, each

    [num_blocks, block_size, num_kv_heads, head_dim]

Block ids index dim 0; the scheduler's ``BlockPool`` owns which ids are free. A token's flat slot is
``block_id * block_size + offset`` (see ``engine.attention.base``).
"""
from __future__ import annotations

import torch

from engine.model_config import ModelConfig


def kv_bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V together."""
    element_size = torch.empty((), dtype=dtype).element_size()
    per_layer = block_size * model_config.num_kv_heads * model_config.head_dim * element_size
    return 2 * model_config.num_layers * per_layer


def allocate_kv_cache(
    model_config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zero-filled caches (zeros, not empty: kernels that read a padded tail never see NaN garbage)."""
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
    shape = (num_blocks, block_size, model_config.num_kv_heads, model_config.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(model_config.num_layers)
    ]

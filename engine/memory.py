"""How much KV the engine keeps: device blocks from the memory budget, and the host pool for offloaded KV."""
from __future__ import annotations

import logging

import torch

from engine.config import EngineConfig
from engine.kv_offload import available_host_memory
from engine.model_config import ModelConfig

logger = logging.getLogger(__name__)


def device_kv_blocks(config: EngineConfig, mc: ModelConfig, block_bytes: int, max_model_len: int,
                     device: torch.device) -> int:
    """KV blocks from the memory budget: on CUDA ``gpu_memory_utilization`` of the device minus what is in use
    and one step's working memory; on CPU ``kv_cache_memory_bytes``. Never more than every running sequence at
    full length could use."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # Headroom for one step's activations and logits (eager, no reuse assumed).
        activations = config.max_num_batched_tokens * (
            mc.hidden_size * 4 + mc.q_size + 2 * mc.kv_size + 2 * mc.intermediate_size) * 4
        logits = config.max_num_seqs * mc.vocab_size * 4 * 3
        budget = int(total * config.gpu_memory_utilization) - (total - free) - activations - logits
    else:
        budget = config.kv_cache_memory_bytes
    ceiling = -(-config.max_num_seqs * max_model_len // config.block_size)
    num_blocks = min(budget // block_bytes, ceiling)
    if num_blocks < 1:
        raise ValueError(f"no memory left for the KV cache ({budget} bytes, {block_bytes} per block): "
                         f"lower max_num_batched_tokens / max_num_seqs or raise the memory budget")
    return int(num_blocks)


def host_kv_bytes(config: EngineConfig, device: torch.device, device_kv_bytes: int) -> int:
    """The host pool for offloaded KV: ``EngineConfig.host_kv_cache_bytes``, or by default on CUDA a share of
    host memory (a quarter of what is available, at most the device KV cache and 16 GiB: pinning takes about
    a second per few GB at start); 0 on CPU, where the KV cache already lives in host memory."""
    if config.host_kv_cache_bytes is not None:
        return config.host_kv_cache_bytes
    if device.type != "cuda":
        return 0
    share = min(available_host_memory() // 4, device_kv_bytes, 16 << 30)
    logger.info("host KV pool: %.1f GB pinned (a quarter of available host memory, at most the device KV "
                "cache and 16 GiB; set EngineConfig.host_kv_cache_bytes to choose)", share / 1e9)
    return share

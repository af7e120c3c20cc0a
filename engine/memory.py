"""How much KV the engine keeps: device blocks from the memory budget, and the host pool for offloaded KV."""
from __future__ import annotations

import logging

import torch

from engine.attention.base import extend_split_partial_bytes
from engine.config import EngineConfig
from engine.kv_offload import available_host_memory
from engine.model_config import ModelConfig
from engine.models.fp32_head import Fp32Head

logger = logging.getLogger(__name__)


def device_kv_blocks(config: EngineConfig, mc: ModelConfig, block_bytes: int, max_model_len: int,
                     device: torch.device, param_bytes: int = 0, mem_get_info=None,
                     region_granularity: int = 0) -> int:
    """KV blocks from the memory budget. On CUDA: ``gpu_memory_utilization`` of the device, minus what is in use
    (the weights, loaded), one eager step's activations, the sampler's logits, the CUDA graphs' pools (decode and mixed-step), the
    backup a weight update keeps of what it overwrites (``update_backup_bytes``, default every parameter's
    bytes), the float32 head's weight copies (``fp32_lm_head``) and, when the KV cache and those copies live in
    fixed-address regions (``engine.device_memory``; ``region_granularity`` > 0), what rounding each region up to
    the allocation granularity adds. On CPU: ``kv_cache_memory_bytes``. Never
    more than every running sequence at full length could use; a budget that cannot hold one sequence of
    ``max_model_len`` fails here, naming each term."""
    ceiling = -(-config.max_num_seqs * max_model_len // config.block_size)
    if device.type == "cuda":
        free, total = (mem_get_info or torch.cuda.mem_get_info)(device)
        per_token = (mc.hidden_size * 4 + mc.q_size + 2 * mc.kv_size + 2 * mc.intermediate_size) * 4
        terms = {
            "in use now (weights, context)": total - free,
            "one eager step's activations": config.max_num_batched_tokens * per_token,
            "sampler logits": config.max_num_seqs * mc.vocab_size * 4 * 3,
            "CUDA graph pool": min(config.cuda_graph_max_batch, config.max_num_seqs) * per_token
            if config.enable_cuda_graphs else 0,
            # the mixed-step graphs keep their own pool: one step of their largest bucket
            "mixed-step CUDA graph pool (cuda_graph_max_tokens)": config.mixed_graph_tokens * per_token,
            # the extend kernel's split-KV partials, at most one layer's at a time: in an eager step, and
            # inside the mixed-step graph pool (a bucket that splits is smaller than the largest)
            "extend attention split partials (extend_kv_splits)": extend_split_partial_bytes(
                config.max_num_batched_tokens, mc.num_heads, mc.head_dim, config.extend_kv_splits)
            + extend_split_partial_bytes(config.mixed_graph_tokens, mc.num_heads, mc.head_dim, config.extend_kv_splits),
            "weight-update backup (update_backup_bytes)": update_backup_bytes(config, param_bytes),
            # allocated after this sizing (LLMEngine), so not in "in use now". Its logits need nothing more:
            # the sampler term above is already float32, and the float32 final hidden states fit in the
            # activation term (counted at 4 bytes an element whatever the dtype).
            "float32 norm + lm_head copies (fp32_lm_head)": Fp32Head.nbytes(mc.vocab_size, mc.hidden_size)
            if config.fp32_head_in_effect else 0,
            # the KV region and the copies' region are rounded up to the granularity (the copies' two tensors are
            # 512-byte aligned in theirs, well inside it); the weights' region is in use already
            "fixed-address regions rounded up to the allocation granularity":
            region_granularity * (2 if config.fp32_head_in_effect else 1),
        }
        allowed = int(total * config.gpu_memory_utilization)
        budget = allowed - sum(terms.values())
    else:
        terms, allowed = {}, config.kv_cache_memory_bytes
        budget = allowed
    num_blocks = min(max(0, budget) // block_bytes, ceiling)
    one_sequence = -(-max_model_len // config.block_size)
    if num_blocks < min(one_sequence, ceiling):
        detail = "; ".join(f"{k} {v / 1e9:.2f} GB" for k, v in terms.items())
        raise ValueError(
            f"the KV cache would hold {max(0, num_blocks) * config.block_size} tokens, less than one sequence of "
            f"max_model_len={max_model_len}: budget {allowed / 1e9:.2f} GB" + (f" minus {detail}" if detail else "")
            + f" leaves {budget / 1e9:.2f} GB for {block_bytes} bytes a block. Lower max_model_len, "
            "max_num_batched_tokens, max_num_seqs or update_backup_bytes, or raise the memory budget")
    return int(num_blocks)


def update_backup_bytes(config: EngineConfig, param_bytes: int) -> int:
    """Device memory a weight update may use for originals of what it overwrites (its rollback)."""
    return param_bytes if config.update_backup_bytes is None else config.update_backup_bytes


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

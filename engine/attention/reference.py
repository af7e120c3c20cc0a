"""Pure-torch paged attention: the test oracle for the GPU kernels and the CPU execution path.

Per sequence it gathers the sequence's K/V through its block table and runs dense causal attention in
float32. Correct on any device, slow on all of them (a Python loop over sequences).
"""
from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata


class TorchReferenceBackend(AttentionBackend):
    name = "reference"

    def forward(
        self,
        q: torch.Tensor,        # [T, Hq, D]
        k: torch.Tensor,        # [T, Hkv, D]
        v: torch.Tensor,        # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:          # [T, Hq, D]
        store_new_kv(q, k, v, k_cache, v_cache, meta)
        # 2. attend, one sequence at a time.
        out = torch.empty_like(q)
        start = 0
        for i, query_len in enumerate(meta.query_lens):
            attend_sequence(q, k_cache, v_cache, meta, scale, i, start, out)
            start += query_len
        return out


def store_new_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
    """1. Every new token's K/V into its slot. The caches are contiguous, so a flat [num_slots, Hkv, D] view
    aliases them."""
    num_kv_heads, head_dim = k_cache.shape[2:]
    assert k_cache.shape[1] == meta.block_size, "cache block_size disagrees with the metadata"
    assert q.shape[0] == meta.num_tokens == sum(meta.query_lens), "one slot per new token"
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))


def attend_sequence(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, i: int, start: int, out: torch.Tensor) -> None:
    """Dense causal attention of sequence ``i`` (its new tokens at ``q[start : start + query_len]``, K/V already
    in the cache) over its whole context, in float32, into ``out`` at the same rows."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    query_len, seq_len = meta.query_lens[i], meta.seq_lens[i]
    n_blocks = -(-seq_len // block_size)
    blocks = meta.block_tables[i, :n_blocks].to(torch.long)
    # keys of positions [0, seq_len): [seq_len, Hkv, D] -> [Hkv, 1, seq_len, D]
    keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    values = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    keys = keys.to(torch.float32).permute(1, 0, 2).unsqueeze(1)
    values = values.to(torch.float32).permute(1, 0, 2).unsqueeze(1)
    # queries grouped by the KV head they read: [query_len, Hq, D] -> [Hkv, group, query_len, D]
    queries = q[start:start + query_len].to(torch.float32)
    queries = queries.reshape(query_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    scores = torch.matmul(queries, keys.transpose(-1, -2)) * scale  # [Hkv, group, query_len, seq_len]
    # query j sits at position seq_len - query_len + j and sees keys at positions <= that
    q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)
    k_pos = torch.arange(seq_len, device=q.device)
    scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o = torch.matmul(probs, values)  # [Hkv, group, query_len, D]
    out[start:start + query_len] = o.permute(2, 0, 1, 3).reshape(query_len, num_heads, head_dim).to(q.dtype)

"""The Triton paged-attention backend: KV store, then decode (split-K) or extend attention.

Registered under "triton" by ``register()`` (the engine calls it); the kernels, and so triton itself, are
imported when a backend is built, not when this module is imported.

Dispatch per forward, on host values only (no device sync):
    every query_len == 1   -> paged decode (GQA-grouped, split-K over the context + log-sum-exp merge)
    otherwise              -> paged extend (prefill chunks over a cached prefix; decodes in the same
                              batch are extend rows of length 1); over ``meta.extend_tiles`` when
                              set (a mixed-step CUDA graph: the grid fixed, the work list on the device)
"""
from __future__ import annotations

import torch

from engine.attention import register_backend
from engine.attention.base import EXTEND_MAX_SPLITS, AttentionBackend, AttentionMetadata, extend_max_splits


class TritonBackend(AttentionBackend):
    name = "triton"
    fuses_rotary = True

    def __init__(self, decode_num_splits: int | None = None, extend_max_splits: int = EXTEND_MAX_SPLITS) -> None:
        """decode_num_splits: fixed split count for decode (set it when capturing CUDA graphs, whose grid
        is frozen); None = chosen per step from the batch size and the longest context. extend_max_splits: most
        KV splits of an extend tile (``EngineConfig.extend_kv_splits``; 1 = none)."""
        from engine.kernels import attention, extend_attention, kv_store  # NOTE: imports triton

        self._attention = attention
        self._extend = extend_attention
        self._store_kv = kv_store.store_kv
        self._rotary_store_kv = kv_store.rotary_store_kv
        self.decode_num_splits = decode_num_splits
        self.extend_max_splits = extend_max_splits

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
        assert k_cache.shape[1] == meta.block_size, "cache block_size disagrees with the metadata"
        assert q.shape[0] == meta.num_tokens, "one slot per new token"
        self._store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self._attend(q, k_cache, v_cache, meta, scale)

    def forward_rotary(self, q, k, v, cos, sin, k_cache, v_cache, meta, scale):
        """Rotary and the KV store in one kernel (q rotated in place, k rotated into the cache), then
        attention."""
        assert k_cache.shape[1] == meta.block_size, "cache block_size disagrees with the metadata"
        assert q.shape[0] == meta.num_tokens, "one slot per new token"
        self._rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, meta.slot_mapping)
        return self._attend(q, k_cache, v_cache, meta, scale)

    def _attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        if meta.is_decode:
            num_splits = self.decode_num_splits
            if num_splits is None:
                num_splits = self._attention.default_num_splits(
                    meta.num_seqs, k_cache.shape[2], max(meta.max_seq_len, 1), q.device)
            return self._attention.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens_tensor, scale, num_splits=num_splits)
        return self._extend.paged_extend_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc,
            meta.max_query_len, scale, tiles=meta.extend_tiles,
            max_splits=extend_max_splits(q.shape[0], self.extend_max_splits),
            max_seq_len=None if meta.extend_tiles is not None else meta.max_seq_len)


def register() -> None:
    """Make ``get_backend("triton")`` available (idempotent)."""
    register_backend("triton", TritonBackend)


__all__ = ["TritonBackend", "register"]

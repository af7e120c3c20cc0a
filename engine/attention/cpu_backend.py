"""Paged attention for the CPU path: the decode rows of a step in one batched gather and two matmuls.

The reference backend (``engine.attention.reference``, the oracle for every kernel) loops over the sequences in
Python, about fifteen torch calls each per layer: at 64 decodes of SmolLM2 (30 layers) that is ~29k calls a step
(tens of microseconds each on this CPU) for little arithmetic. Here every sequence with a query of one token
(every decode row, also inside a step with prefill chunks) is served at once, over its keys gathered through a
block table padded to the longest context among them::

    decode rows d = 0 .. B-1, L = ceil(max seq_len / block_size) * block_size
    keys    k_cache[block_tables[d, :L / bs]] -> [B, L, Hkv, D] -> [B, Hkv, D, L]   (values: [B, Hkv, L, D])
    scores  q [B, Hkv, group, D] @ keys -> [B, Hkv, group, L], key positions >= seq_len[d] set to -inf
    out     softmax(scores) @ values -> [B, Hkv, group, D] -> [B, Hq, D]

Sequences with several new tokens (prefill chunks) go through the reference's per-sequence loop, where the
arithmetic per call is large enough. Float32 throughout, as the reference; results agree with it to float32
rounding (not bitwise: a row's sums run over the padded length of its batch, masked keys adding exact zeros, and
the matmul's blocking may differ with that length). Only float32 engines (the CPU default) batch: in a bf16 or
fp16 engine those float32 differences cross a rounding of the low-precision output now and then, and the tests
that hold a bf16 CPU engine to transformers' bf16 forward (tests/engine/test_fp32_head.py, 1e-5 on logprobs) need
the reference's per-sequence sums. Chosen on CPU by default; ``attention_backend="reference"`` keeps the loop.
"""
from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.attention.reference import TorchReferenceBackend, attend_sequence, store_new_kv


class CpuBatchedBackend(AttentionBackend):
    name = "cpu"

    def __init__(self) -> None:
        self._reference = TorchReferenceBackend()

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
        decode_rows = [i for i, n in enumerate(meta.query_lens) if n == 1]
        if len(decode_rows) < 2 or q.dtype != torch.float32:   # nothing to batch, or a low-precision engine
            return self._reference.forward(q, k, v, k_cache, v_cache, meta, scale)
        _, block_size, num_kv_heads, head_dim = k_cache.shape
        num_heads = q.shape[1]
        group = num_heads // num_kv_heads
        store_new_kv(q, k, v, k_cache, v_cache, meta)     # 1. every new token's K/V, as the reference does

        out = torch.empty_like(q)
        starts = meta.query_start_loc.tolist()
        # 2. the decode rows at once. Token index of decode row i = starts[i] (its only token).
        dev = q.device
        tok = torch.tensor([starts[i] for i in decode_rows], dtype=torch.long, device=dev)
        lens = [meta.seq_lens[i] for i in decode_rows]
        n_blocks = -(-max(lens) // block_size)
        span = n_blocks * block_size
        rows = torch.tensor(decode_rows, dtype=torch.long, device=meta.block_tables.device)
        tables = meta.block_tables[rows][:, :n_blocks].to(torch.long)                 # [B, nb]
        batch = len(decode_rows)
        # [B, nb, bs, Hkv, D] -> [B, L, Hkv, D] -> keys [B, Hkv, D, L], values [B, Hkv, L, D]
        keys = k_cache[tables].reshape(batch, span, num_kv_heads, head_dim).to(torch.float32)
        values = v_cache[tables].reshape(batch, span, num_kv_heads, head_dim).to(torch.float32)
        queries = q[tok].to(torch.float32).reshape(batch, num_kv_heads, group, head_dim)
        scores = torch.matmul(queries, keys.permute(0, 2, 3, 1)) * scale                # [B, Hkv, group, L]
        # row d sees key positions < seq_len[d] (its new token is at seq_len[d] - 1)
        pad = torch.arange(span, device=dev)[None, :] >= torch.tensor(lens, device=dev)[:, None]   # [B, L]
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        o = torch.matmul(torch.softmax(scores, dim=-1), values.permute(0, 2, 1, 3))     # [B, Hkv, group, D]
        out[tok] = o.reshape(batch, num_heads, head_dim).to(q.dtype)

        # 3. the sequences with several new tokens, one at a time (their K/V is stored already)
        for i, n in enumerate(meta.query_lens):
            if n > 1:
                attend_sequence(q, k_cache, v_cache, meta, scale, i, starts[i], out)
        return out

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

from dataclasses import dataclass

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
        if q.dtype != torch.float32:                        # a low-precision engine: the reference's sums
            return self._reference.forward(q, k, v, k_cache, v_cache, meta, scale)
        # what indexes the decode rows is the same in every layer: built once a step (None: fewer than 2)
        if self.name not in meta.derived:
            meta.derived[self.name] = _DecodeRows.build(meta, q.device)
        plan = meta.derived[self.name]
        if plan is None:                                    # nothing to batch
            return self._reference.forward(q, k, v, k_cache, v_cache, meta, scale)
        _, block_size, num_kv_heads, head_dim = k_cache.shape
        num_heads = q.shape[1]
        group = num_heads // num_kv_heads
        store_new_kv(q, k, v, k_cache, v_cache, meta)     # 1. every new token's K/V, as the reference does

        # 2. the decode rows at once
        batch, span = plan.tok.shape[0], plan.pad.shape[1]
        # [B, nb, bs, Hkv, D] -> [B, L, Hkv, D] -> keys [B, Hkv, D, L], values [B, Hkv, L, D]
        keys = k_cache[plan.tables].reshape(batch, span, num_kv_heads, head_dim).to(torch.float32)
        values = v_cache[plan.tables].reshape(batch, span, num_kv_heads, head_dim).to(torch.float32)
        queries = q[plan.tok].to(torch.float32).reshape(batch, num_kv_heads, group, head_dim)
        scores = torch.matmul(queries, keys.permute(0, 2, 3, 1)) * scale                # [B, Hkv, group, L]
        scores = scores.masked_fill(plan.pad[:, None, None, :], float("-inf"))
        o = torch.matmul(torch.softmax(scores, dim=-1), values.permute(0, 2, 1, 3))     # [B, Hkv, group, D]
        out = torch.empty_like(q)
        out[plan.tok] = o.reshape(batch, num_heads, head_dim).to(q.dtype)

        # 3. the sequences with several new tokens, one at a time (their K/V is stored already)
        for i in plan.chunk_rows:
            attend_sequence(q, k_cache, v_cache, meta, scale, i, plan.starts[i], out)
        return out


@dataclass(frozen=True)
class _DecodeRows:
    """One step's decode rows as the batched path indexes them (built from the metadata once, read per layer)."""
    tok: torch.Tensor           # [B] int64: flat token index of each decode row (its only new token)
    tables: torch.Tensor        # [B, nb] int64: their block tables, cut to the longest one's blocks
    pad: torch.Tensor           # [B, L] bool: key positions past each row's context (L = nb * block_size)
    starts: list[int]           # first token index of every sequence
    chunk_rows: list[int]       # sequences with several new tokens (the per-sequence path)

    @classmethod
    def build(cls, meta: AttentionMetadata, device: torch.device) -> "_DecodeRows | None":
        decode_rows = [i for i, n in enumerate(meta.query_lens) if n == 1]
        if len(decode_rows) < 2:
            return None
        starts = meta.query_start_loc.tolist()
        lens = [meta.seq_lens[i] for i in decode_rows]
        n_blocks = -(-max(lens) // meta.block_size)
        rows = torch.tensor(decode_rows, dtype=torch.long, device=meta.block_tables.device)
        tables = meta.block_tables[rows][:, :n_blocks].to(torch.long)
        # row d sees key positions < seq_len[d] (its new token is at seq_len[d] - 1)
        pad = torch.arange(n_blocks * meta.block_size, device=device)[None, :] >= \
            torch.tensor(lens, device=device)[:, None]
        tok = torch.tensor([starts[i] for i in decode_rows], dtype=torch.long, device=device)
        return cls(tok, tables, pad, starts, [i for i, n in enumerate(meta.query_lens) if n > 1])

"""Triton kernels for the GPU path: paged attention (decode, extend), KV store (optionally with
rotary), fused elementwise ops and matrix-vector products for decode batches of a few rows (``gemv``).

Every kernel has a pure-torch counterpart that is its test oracle (``engine.attention.reference`` for
attention, ``engine.models.decoder`` for the elementwise ops); ``tests/engine/test_kernels.py`` compares them
under ``TRITON_INTERPRET=1`` on the CPU and natively on CUDA.

Importing this package imports triton; import it lazily (``engine.attention.triton_backend`` does).
"""
from __future__ import annotations

from engine.kernels.attention import default_num_splits, paged_decode_attention
from engine.kernels.extend_attention import paged_extend_attention
from engine.kernels.elementwise import apply_rotary_, rms_norm, silu_and_mul
from engine.kernels.gemv import gemv, norm_gemv, silu_mul_gemv
from engine.kernels.greedy import greedy_sample
from engine.kernels.kv_store import rotary_store_kv, store_kv

__all__ = [
    "apply_rotary_",
    "default_num_splits",
    "gemv",
    "greedy_sample",
    "norm_gemv",
    "paged_decode_attention",
    "paged_extend_attention",
    "rms_norm",
    "rotary_store_kv",
    "silu_and_mul",
    "silu_mul_gemv",
    "store_kv",
]

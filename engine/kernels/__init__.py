"""Triton kernels for the GPU path: paged attention (decode, extend), KV store and fused elementwise ops.

Every kernel has a pure-torch counterpart that is its test oracle (``engine.attention.reference`` for
attention, ``engine.models.decoder`` for the elementwise ops); ``tests/engine/test_kernels.py`` compares them
under ``TRITON_INTERPRET=1`` on the CPU and natively on CUDA.

Importing this package imports triton; import it lazily (``engine.attention.triton_backend`` does).
"""
from __future__ import annotations

from engine.kernels.attention import (default_num_splits, paged_decode_attention,
                                      paged_extend_attention)
from engine.kernels.elementwise import apply_rotary_, rms_norm, silu_and_mul
from engine.kernels.kv_store import store_kv

__all__ = [
    "apply_rotary_",
    "default_num_splits",
    "paged_decode_attention",
    "paged_extend_attention",
    "rms_norm",
    "silu_and_mul",
    "store_kv",
]

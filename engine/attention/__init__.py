"""Attention backends (registry by name) and host-side helpers that build their per-step metadata."""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.attention.cpu_backend import CpuBatchedBackend
from engine.attention.reference import TorchReferenceBackend

logger = logging.getLogger(__name__)

_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {"reference": TorchReferenceBackend, "cpu": CpuBatchedBackend}


def register_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    """Register a backend factory (e.g. "triton", imported lazily by its own module)."""
    _BACKENDS[name] = factory


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def choose_backend(forced: Optional[str], device: torch.device) -> str:
    """The backend's name: ``forced`` (EngineConfig.attention_backend) or ROLLOUT_ATTENTION_BACKEND; else Triton
    on CUDA (the pure-torch reference when Triton cannot be imported) and elsewhere "cpu" (the reference with its
    decode rows batched: engine.attention.cpu_backend)."""
    from engine.envs import envs

    forced = forced or envs().attention_backend
    name = forced or ("triton" if device.type == "cuda" else "cpu")
    if name == "triton":
        try:
            from engine.attention import triton_backend
            triton_backend.register()
        except ImportError as e:
            if forced:
                raise ValueError(f"attention_backend: 'triton' requested but Triton is unavailable ({e})") from e
            logger.warning("Triton unavailable (%s): using the reference attention backend", e)
            return "reference"
    if not forced:
        logger.info("attention backend %r chosen automatically for device %s (force one with "
                    "EngineConfig.attention_backend or ROLLOUT_ATTENTION_BACKEND)", name, device)
    return name


def get_backend(name: str) -> AttentionBackend:
    try:
        factory = _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; available: {available_backends()}") from None
    return factory()


def build_positions(query_lens: Sequence[int], seq_lens: Sequence[int]) -> np.ndarray:
    """Positions of the new tokens, flat in sequence order: sequence i contributes
    [seq_len_i - query_len_i, seq_len_i). -> int64 [sum(query_lens)]."""
    q = np.asarray(query_lens, dtype=np.int64)
    s = np.asarray(seq_lens, dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(q)[:-1])) if len(q) else np.zeros(0, np.int64)
    # token t of sequence i (flat index starts[i] + j) is at position (s[i] - q[i]) + j
    return np.arange(int(q.sum()), dtype=np.int64) - np.repeat(starts - (s - q), q)


def build_metadata(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for one step from host lists (one entry per sequence, in flat-token order).

    slot of the token at position p of sequence i (block table bt = block_tables[i])::

        slot = bt[p // block_size] * block_size + p % block_size
    """
    num_seqs = len(query_lens)
    if not (len(seq_lens) == len(block_tables) == num_seqs):
        raise ValueError("query_lens, seq_lens and block_tables need one entry per sequence")
    q = np.asarray(query_lens, dtype=np.int64)
    s = np.asarray(seq_lens, dtype=np.int64)
    if np.any(q <= 0) or np.any(q > s):
        raise ValueError(f"need 0 < query_len <= seq_len, got {list(query_lens)} / {list(seq_lens)}")
    needed = -(-s // block_size)
    max_blocks = max([1] + [len(bt) for bt in block_tables])
    table = np.zeros((num_seqs, max_blocks), dtype=np.int32)  # padding (0) is never read
    for i, bt in enumerate(block_tables):
        if len(bt) < needed[i]:
            raise ValueError(f"sequence {i}: seq_len {s[i]} needs {needed[i]} blocks of {block_size}, "
                             f"block table has {len(bt)}")
        table[i, :len(bt)] = bt
    positions = build_positions(q, s)
    seq_idx = np.repeat(np.arange(num_seqs), q)
    slots = table[seq_idx, positions // block_size].astype(np.int64) * block_size + positions % block_size
    query_start_loc = np.concatenate(([0], np.cumsum(q))).astype(np.int32)
    return AttentionMetadata(
        query_lens=[int(x) for x in q],
        seq_lens=[int(x) for x in s],
        query_start_loc=torch.from_numpy(query_start_loc).to(device),
        seq_lens_tensor=torch.from_numpy(s.astype(np.int32)).to(device),
        block_tables=torch.from_numpy(table).to(device),
        slot_mapping=torch.from_numpy(slots).to(device),
        block_size=block_size,
    )


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "TorchReferenceBackend",
    "CpuBatchedBackend",
    "available_backends",
    "build_metadata",
    "build_positions",
    "get_backend",
    "register_backend",
]

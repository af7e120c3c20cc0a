"""CUDA graphs for pure-decode steps (nano-vllm / mini-sglang style).

One graph per padded batch size (1, 2, 4, 8, 16, 32, 64, 128, 256 up to ``max_batch``), captured after the
weights are loaded, largest first, all in one memory pool. Each graph runs the model forward (embedding to
final norm) over the static inputs of ``GraphInputs``; logits are computed eagerly on the real rows only.

Invariants a replay relies on:
  - every address the graph reads is fixed: the static inputs, the KV caches, the parameters. Weight
    updates copy into the parameters in place (``param.copy_``), so graphs stay valid across updates;
    replacing a Parameter object (or reallocating the KV cache) invalidates them.
  - padding rows (batch rows past the real ones) have slot -1 (the KV store skips them) and seq_len 0 (the
    decode kernel writes zeros), so they neither write the cache nor produce NaN.
  - the attention backend of a graph has a fixed ``decode_num_splits``: its grid is frozen at capture.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from engine.attention.base import AttentionBackend
from engine.step_inputs import GraphInputs

logger = logging.getLogger(__name__)

CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """Captured sizes up to ``max_batch`` (and ``max_batch`` itself when it is not a power of two)."""
    sizes = [s for s in CAPTURE_SIZES if s <= max_batch]
    if max_batch not in sizes and max_batch < CAPTURE_SIZES[-1]:
        sizes.append(max_batch)
    return sizes


def decode_splits(batch: int, num_kv_heads: int, num_sms: int, max_splits: int = 16) -> int:
    """Split-K count frozen into the graph of ``batch`` rows: about two programs per SM for the shortest
    useful split; a power of two. Empty trailing splits of short contexts cost one early exit each."""
    want = -(-2 * num_sms // max(1, batch * num_kv_heads))
    n = max(1, min(want, max_splits))
    return 1 << (n - 1).bit_length()


class DecodeGraphs:
    """Captured decode graphs of one model: ``padded_batch(n)`` picks the smallest captured batch that
    holds n rows, ``replay(batch)`` runs it."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 backend_for_batch: Callable[[int], AttentionBackend], block_size: int, max_blocks: int,
                 max_batch: int, device: torch.device) -> None:
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.inputs = GraphInputs(self.max_batch, max_blocks, block_size, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}   # [bs, hidden] in the graph pool
        t0 = time.perf_counter()
        pool = None
        inp = self.inputs
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its pool blocks
            backend = backend_for_batch(bs)
            meta = inp.metadata(bs)
            args = (inp.input_ids[:bs], inp.positions[:bs], kv_caches, meta, backend)
            model(*args)  # warm-up: compiles the kernels of this size outside the capture
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = model(*args)
            if pool is None:
                pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(device)
        logger.info("captured %d decode CUDA graphs (batch %s) in %.1f s", len(self.graphs), self.sizes,
                    time.perf_counter() - t0)

    def padded_batch(self, num_seqs: int) -> int | None:
        """The captured size that holds ``num_seqs`` rows, or None when none does."""
        for bs in self.sizes:
            if bs >= num_seqs:
                return bs
        return None

    def replay(self, batch: int) -> torch.Tensor:
        """Run the graph of ``batch`` rows on the loaded static inputs -> hidden [batch, hidden] (valid until
        the next replay)."""
        self.graphs[batch].replay()
        return self.outputs[batch]

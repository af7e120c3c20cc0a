"""CUDA graphs for steps with prefill chunks: any mix of new-token counts, padded to a token bucket.

Why: an eagerly run forward launches ~10 kernels a layer from Python. On an H200 that host work costs 17 ms a
step on a 24-layer 0.5B model and 19 ms on a 32-layer 8B one, as long as the device work of a step of a few
hundred tokens (benchmarks/multi_turn.py, device time by step kind): a multi-turn step that prefills one
new observation beside the running decodes was host-bound. Replayed from a graph it costs one launch.

How: one graph per token bucket T (16 .. ``max_tokens``, finer steps for small T where padding costs most),
captured largest first in one memory pool, each over static inputs (``engine.step_inputs.MixedGraphInputs``):
the first T token entries (ids, positions, slots), every sequence slot (``max_seqs``: query_start_loc,
seq_lens, block tables) and a device work list for the extend attention kernel, one entry per tile of new
tokens of one sequence (``engine.step_inputs.extend_tiles``). The kernel's grid is the work list's length,
fixed per bucket, so no host value of the step reaches a kernel: every mix of sequences whose tokens fit
the bucket replays the same graph. Padding tokens have slot -1 (the KV store skips them) and belong to no
tile (their attention rows are never computed; every other op is row-wise, so they touch no real row);
padding sequence slots have no new tokens and no tiles.

Invariants a replay relies on are those of ``engine.cuda_graphs``: fixed addresses (static inputs, KV
caches, parameters updated in place), re-capture after the KV or the weights are reallocated (a wake without
fixed-address memory, ``engine.device_memory``).
"""
from __future__ import annotations

import bisect
import logging
import time

import torch

from engine.attention.base import AttentionBackend
from engine.step_inputs import MixedGraphInputs

logger = logging.getLogger(__name__)

MIN_TOKENS = 16


def mixed_graph_sizes(max_tokens: int) -> list[int]:
    """Token buckets up to ``max_tokens``: every 16 to 256, every 32 to 512, every 64 to 1024, then every 128
    (a step is padded by under 16 tokens or under 1/8 of its own), and ``max_tokens`` itself."""
    sizes, t = [], MIN_TOKENS
    while t <= max_tokens:
        sizes.append(t)
        t += 16 if t < 256 else 32 if t < 512 else 64 if t < 1024 else 128
    if max_tokens >= MIN_TOKENS and sizes[-1] != max_tokens:
        sizes.append(max_tokens)
    return sizes


class MixedGraphs:
    """Captured mixed-step graphs of one model: ``bucket(num_tokens, num_seqs)`` picks the smallest bucket
    that holds a step, ``replay(bucket)`` runs it on the loaded static inputs."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 backend: AttentionBackend, block_size: int, max_blocks: int, max_tokens: int, max_seqs: int,
                 tile_tokens: int, device: torch.device, recapture: bool = False) -> None:
        """recapture: the same model and sizes were captured before (kernels compiled): skip the warm-up runs."""
        self.sizes = mixed_graph_sizes(max_tokens)
        if not self.sizes:
            raise ValueError(f"mixed-step graphs need max_tokens >= {MIN_TOKENS}, got {max_tokens}")
        self.max_tokens = self.sizes[-1]
        self.max_seqs = max_seqs
        self.inputs = MixedGraphInputs(self.max_tokens, max_seqs, max_blocks, block_size, tile_tokens, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}   # [T, hidden] in the graph pool
        self._device = device
        t0 = time.perf_counter()
        pool = None
        self.pool = None       # the graphs' memory pool id
        inp = self.inputs
        for t in reversed(self.sizes):   # largest first: smaller graphs reuse its pool blocks
            args = (inp.input_ids[:t], inp.positions[:t], kv_caches, inp.metadata(t), backend)
            if not recapture:
                model(*args)   # compiles this size's kernels outside the capture; the inputs write nothing
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[t] = model(*args)
            if pool is None:
                pool = self.pool = graph.pool()
            self.graphs[t] = graph
        torch.cuda.synchronize(device)
        logger.info("captured %d mixed-step CUDA graphs (%d-%d tokens, up to %d sequences) in %.1f s",
                    len(self.graphs), self.sizes[0], self.max_tokens, max_seqs, time.perf_counter() - t0)

    def bucket(self, num_tokens: int, num_seqs: int) -> int | None:
        """The smallest captured bucket holding ``num_tokens`` tokens of ``num_seqs`` sequences, or None."""
        if num_seqs > self.max_seqs or num_tokens > self.max_tokens:
            return None
        return self.sizes[bisect.bisect_left(self.sizes, num_tokens)]

    def replay(self, bucket: int) -> torch.Tensor:
        """Run the graph of ``bucket`` tokens -> hidden [bucket, hidden] (valid until the next replay)."""
        self.graphs[bucket].replay()
        return self.outputs[bucket]

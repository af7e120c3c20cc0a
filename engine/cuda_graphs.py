"""CUDA graphs for pure-decode steps (nano-vllm / mini-sglang style).

One graph per padded batch size (1, 2, 4, 8, 16, 32, 64, 128, 256 up to ``max_batch``), captured after the
weights are loaded, largest first, all in one memory pool. Each graph runs the model forward (embedding to
final norm) over the static inputs of ``GraphInputs``; logits are computed eagerly on the real rows only.

Invariants a replay relies on:
  - every address the graph reads is fixed: the static inputs, the KV caches, the parameters. Weight
    updates copy into the parameters in place (``param.copy_``), so graphs stay valid across updates;
    reallocating a parameter (or the KV cache) invalidates them. A sleep with fixed-address memory
    (``engine.device_memory``) unmaps and re-maps the KV cache and the weights at the same addresses: the
    graphs stay valid; without it a wake re-captures them.
  - padding rows (batch rows past the real ones) have slot -1 (the KV store skips them) and seq_len 0 (the
    decode kernel writes zeros), so they neither write the cache nor produce NaN.
  - the attention backend of a graph has a fixed ``decode_num_splits``: its grid is frozen at capture.

Small batches (up to ``engine.kernels.gemv.MAX_ROWS`` rows) can run their projections with the matrix-vector
kernels (``DecoderLayer.gemv_rows``) instead of cuBLAS. Which is faster depends on the card and the model's
shapes, so with ``decode_gemv="auto"`` both graphs are captured for those sizes and replayed in turn, and the
faster one is kept (logged); "on" / "off" force the choice.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from engine.attention.base import AttentionBackend, decode_split_count
from engine.step_inputs import GraphInputs

logger = logging.getLogger(__name__)

CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DECODE_GEMV_MODES = ("auto", "on", "off")


def graph_batch_sizes(max_batch: int) -> list[int]:
    """Captured sizes up to ``max_batch`` (and ``max_batch`` itself when it is not a power of two)."""
    sizes = [s for s in CAPTURE_SIZES if s <= max_batch]
    if max_batch not in sizes and max_batch < CAPTURE_SIZES[-1]:
        sizes.append(max_batch)
    return sizes


def decode_splits(batch: int, num_kv_heads: int, num_sms: int, max_splits: int = 16) -> int:
    """Split-K count frozen into the graph of ``batch`` rows (``decode_split_count`` without a context
    length: a graph serves every length). Empty trailing splits of short contexts cost one early exit each."""
    return decode_split_count(batch, num_kv_heads, num_sms, max_splits)


class DecodeGraphs:
    """Captured decode graphs of one model: ``padded_batch(n)`` picks the smallest captured batch that
    holds n rows, ``replay(batch)`` runs it."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 backend_for_batch: Callable[[int], AttentionBackend], block_size: int, max_blocks: int,
                 max_batch: int, device: torch.device, decode_gemv: str = "auto", gemv_max_rows: int = 0,
                 known_gemv: dict[int, bool] | None = None) -> None:
        """decode_gemv: "auto" | "on" | "off" for batches up to ``gemv_max_rows`` (0: the model has no
        matrix-vector path). ``known_gemv``: the choices an earlier capture of the same model made ("auto"
        only): a re-capture (wake after sleep) takes them instead of capturing and timing both graphs again."""
        if decode_gemv not in DECODE_GEMV_MODES:
            raise ValueError(f"decode_gemv must be one of {DECODE_GEMV_MODES}, got {decode_gemv!r}")
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.inputs = GraphInputs(self.max_batch, max_blocks, block_size, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}   # [bs, hidden] in the graph pool
        self.gemv: dict[int, bool] = {}              # batch -> its graph runs the matrix-vector kernels
        self.timings: dict[int, dict[str, float]] = {}  # batch -> {"cublas": ms, "gemv": ms} ("auto" only)
        self._device = device
        self._recapture = known_gemv is not None   # the same model and sizes captured before: kernels compiled
        t0 = time.perf_counter()
        self._pool = None
        inp = self.inputs
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its pool blocks
            backend = backend_for_batch(bs)
            args = (inp.input_ids[:bs], inp.positions[:bs], kv_caches, inp.metadata(bs), backend)
            if bs > gemv_max_rows or decode_gemv == "off":
                choices = [False]
            elif decode_gemv == "auto" and known_gemv is not None and bs in known_gemv:
                choices = [known_gemv[bs]]
            else:
                choices = [True] if decode_gemv == "on" else [False, True]
            captured = {}
            for use_gemv in choices:
                if gemv_max_rows:
                    model.set_gemv_rows(bs if use_gemv else 0)
                captured[use_gemv] = self._capture(model, args)
            if len(captured) > 1:
                self.timings[bs] = times = self._compare({"gemv" if g else "cublas": c[0] for g, c in captured.items()})
                winner = times["gemv"] < times["cublas"]
                logger.info("decode graph batch %d: matrix-vector kernels %.3f ms, cuBLAS %.3f ms per replay -> %s",
                            bs, times["gemv"], times["cublas"], "matrix-vector" if winner else "cuBLAS")
            else:
                winner = choices[0]
            self.graphs[bs], self.outputs[bs] = captured.pop(winner)
            self.gemv[bs] = winner
            del captured  # the loser's graph: its pool blocks are reused by the next capture
        if gemv_max_rows:
            model.set_gemv_rows(self.gemv_rows)
        torch.cuda.synchronize(device)
        logger.info("captured %d decode CUDA graphs (batch %s) in %.1f s; matrix-vector kernels for batch %s",
                    len(self.graphs), self.sizes, time.perf_counter() - t0,
                    [bs for bs in self.sizes if self.gemv[bs]] or "none")

    @property
    def pool(self):
        """The graphs' memory pool id (``torch.cuda.graph_pool_handle`` form)."""
        return self._pool

    @property
    def gemv_rows(self) -> int:
        """The largest n such that every captured batch up to n chose the matrix-vector kernels (what eager
        forwards of few tokens use too)."""
        rows = 0
        for bs in self.sizes:
            if not self.gemv.get(bs):
                break
            rows = bs
        return rows

    def _capture(self, model: torch.nn.Module, args) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if not self._recapture:
            model(*args)  # warm-up: compiles the kernels of this size outside the capture (a re-capture has them)
        torch.cuda.synchronize(self._device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = model(*args)
        if self._pool is None:
            self._pool = graph.pool()
        return graph, out

    def _compare(self, graphs: dict[str, torch.cuda.CUDAGraph], rounds: int = 3, iters: int = 10) -> dict[str, float]:
        """Median ms per replay of each graph, replayed in turn (``rounds`` x ``iters`` each). The static
        inputs hold padding rows (slot -1, length 0), so replays write nothing to the KV cache."""
        samples: dict[str, list[float]] = {name: [] for name in graphs}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(rounds):
            for name, graph in graphs.items():
                graph.replay()
                start.record()
                for _ in range(iters):
                    graph.replay()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / iters)
        return {name: sorted(v)[len(v) // 2] for name, v in samples.items()}

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

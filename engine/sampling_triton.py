"""``TritonSampler``: ``engine.sampling.Sampler``'s interface and semantics on one sort-free kernel
(``engine.kernels.sampling``), for the GPU. ``Sampler`` stays the CPU path and the oracle of the tests.

Per call: the rows' settings are packed with numpy into one int64 [R, 8] array and go up with one
non-blocking copy from pinned memory; one kernel launch samples every row (greedy, temperature, top-k,
top-p, min-p), writes the token, its logprob and the row's log-sum-exp; top logprobs, when a row asks for
them, are ``topk`` of the asked rows only. Nothing waits for the device.

Randomness: a seeded row's noise is keyed by (seed, sample_index, step) only, as in ``Sampler``, so its
token does not depend on the batch; the stream differs from ``Sampler``'s (a torch generator's), as the CPU
and CUDA generators differ. Unseeded rows are keyed by (the sampler's seed, a call counter, the row).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engine.kernels.sampling import NUM_PARAMS, sample_logits
from engine.sampling import DeviceSample, SamplingRow, upload_nonblocking
from engine.sampling_params import GREEDY_TEMPERATURE

_MASK64 = (1 << 64) - 1


def _int64(v: int) -> int:
    """An int of any size or sign reduced mod 2**64, as the signed int64 with the same bits."""
    if -(1 << 63) <= v < (1 << 63):
        return v
    v &= _MASK64
    return v - (1 << 64) if v >> 63 else v


def pack_rows(rows: list[SamplingRow], vocab: int, sampler_seed: int, call: int) -> np.ndarray:
    """The kernel's int64 [R, NUM_PARAMS] parameters (layout: ``engine.kernels.sampling``). Two list
    comprehensions and two numpy conversions: a few hundred rows a step cost ~0.1 ms of host time."""
    seed = _int64(sampler_seed)
    inf = math.inf
    floats = np.array([(0.0, 1.0, -inf) if r.temperature < GREEDY_TEMPERATURE else
                       (r.temperature, r.top_p, math.log(r.min_p) if r.min_p > 0.0 else -inf) for r in rows],
                      dtype=np.float64).reshape(len(rows), 3)
    ints = np.array([(r.top_k if 0 < r.top_k < vocab and r.temperature >= GREEDY_TEMPERATURE else 0,
                      seed, call, i, 1) if r.seed is None else
                     (r.top_k if 0 < r.top_k < vocab and r.temperature >= GREEDY_TEMPERATURE else 0,
                      _int64(r.seed), r.sample_index, r.step, 0) for i, r in enumerate(rows)],
                    dtype=np.int64).reshape(len(rows), NUM_PARAMS - 3)
    out = np.empty((len(rows), NUM_PARAMS), dtype=np.int64)
    out[:, :3] = floats.view(np.int64)
    out[:, 3:] = ints
    return out


@dataclass
class KernelSample(DeviceSample):
    """``DeviceSample`` plus the kernel's [2, R] float64 (token id, logprob): one device->host copy."""

    packed: torch.Tensor | None = None


class TritonSampler:
    """Samples one token per row on the device without sorting the vocabulary; see ``engine.sampling`` for the
    semantics (the same) and ``engine.kernels.sampling`` for how."""

    def __init__(self, seed: int = 0, *, block_rows: int = 1, block_v: int | None = None) -> None:
        """block_rows / block_v: the kernel's tiling (``sample_logits``); defaults are the GPU's."""
        self.seed = seed
        self.block_rows = block_rows
        self.block_v = block_v
        self._calls = 0   # keys the noise of unseeded rows: every call draws afresh

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]):
        return self.sample(logits, rows).to_host()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> KernelSample:
        """Queue the sampling of every row on logits' device (``DeviceSample.to_host`` reads it)."""
        # logits: [R, V], any float dtype (the lm_head's bf16 output is read as is)
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}")
        vocab = logits.shape[1]
        device = logits.device
        if not rows:
            empty = torch.zeros(0, dtype=torch.float32, device=device)
            return KernelSample(empty.long(), empty, rows, None, None, [], torch.zeros((2, 0), dtype=torch.float64))
        params = pack_rows(rows, vocab, self.seed, self._calls)
        self._calls += 1
        params_dev = torch.from_numpy(params)
        params_dev = params_dev.pin_memory().to(device, non_blocking=True) if device.type == "cuda" \
            else params_dev.to(device)
        token_ids, packed, lse = sample_logits(logits, params_dev, block_rows=self.block_rows, block_v=self.block_v)

        top_vals = top_ids = None
        asked = [i for i, r in enumerate(rows) if r.num_logprobs]
        if asked:
            kmax = min(max(rows[i].num_logprobs for i in asked), vocab)
            aidx = upload_nonblocking(asked, torch.long, device)
            temps = upload_nonblocking([1.0 if rows[i].is_greedy else rows[i].temperature for i in asked],
                                       torch.float32, device)
            vals, top_ids = (logits[aidx].float() / temps[:, None]).topk(kmax, dim=-1)   # [A, kmax], descending
            top_vals = vals - lse[aidx, None]
        return KernelSample(token_ids, packed[1], rows, top_vals, top_ids, asked, packed)


__all__ = ["KernelSample", "TritonSampler", "pack_rows"]

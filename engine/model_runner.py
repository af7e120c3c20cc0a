"""Turns a ``SchedulerOutput`` into one forward pass and one sampling call.

Owns the model, the KV tensors, the attention backend and the sampler; knows nothing of requests
beyond the per-row sampling settings the engine hands it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionBackend, build_metadata
from engine.kv_offload import HostKVCache
from engine.model_config import ModelConfig
from engine.sampling import Sampler, SamplingRow
from scheduler import SchedulerOutput


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], backend: AttentionBackend,
                 block_size: int, device: torch.device, sampler: Sampler,
                 host_cache: HostKVCache | None = None) -> None:
        self.model = model
        self.model_config = model_config
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        self.host_cache = host_cache

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, rows: dict[int, SamplingRow]) -> dict[int, SampledToken]:
        """Run the step; ``rows`` holds the sampling settings of every item with ``sample=True``
        (keyed by seq_id). Returns seq_id -> sampled token."""
        if output.swap_out or output.swap_in:
            assert self.host_cache is not None, "the scheduler offloaded KV without a host pool"
            self.host_cache.swap(output.swap_out, output.swap_in)
        items = output.scheduled
        if not items:
            return {}
        query_lens = [it.num_tokens for it in items]
        seq_lens = [it.seq_len for it in items]
        meta = build_metadata(query_lens, seq_lens, [it.block_ids for it in items], self.block_size, self.device)
        # input_ids, positions: [num_tokens], flat in scheduled order
        input_ids = torch.from_numpy(np.fromiter(
            (t for it in items for t in it.token_ids), dtype=np.int64, count=output.num_batched_tokens)).to(self.device)
        positions = torch.from_numpy(np.concatenate(
            [np.arange(it.start_pos, it.seq_len, dtype=np.int64) for it in items])).to(self.device)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, self.backend)  # [T, hidden]
        sample_items = [(i, it) for i, it in enumerate(items) if it.sample]
        if not sample_items:
            return {}
        # The last token of each sampling item: query_start_loc[i + 1] - 1.
        ends = np.cumsum(query_lens)
        last_rows = torch.as_tensor([int(ends[i]) - 1 for i, _ in sample_items], device=self.device)
        logits = self.model.compute_logits(hidden[last_rows])  # [R, vocab] float32
        sampled = self.sampler(logits, [rows[it.seq_id] for _, it in sample_items])
        tops = sampled.top_logprobs
        return {
            it.seq_id: SampledToken(sampled.token_ids[r], sampled.logprobs[r],
                                    tops[r] if tops is not None and rows[it.seq_id].num_logprobs is not None else None)
            for r, (_, it) in enumerate(sample_items)
        }

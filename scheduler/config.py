"""Scheduler configuration (frozen, validated)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int                      # KV blocks in the device pool
    block_size: int = 16                 # tokens per KV block
    max_num_seqs: int = 256              # sequences running at once
    max_num_batched_tokens: int = 8192   # tokens per step (prefill chunks + decodes)
    max_model_len: int = 4096            # prompt + output tokens of one sequence
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SchedulerConfig.{name} must be a positive int, got {value!r}")

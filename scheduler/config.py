"""Scheduler configuration (frozen, validated)."""
from __future__ import annotations

from dataclasses import dataclass

PREEMPTION_POLICIES = ("never", "swap", "recompute")


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int                      # KV blocks in the device pool
    block_size: int = 16                 # tokens per KV block
    max_num_seqs: int = 256              # sequences running at once
    max_num_batched_tokens: int = 8192   # tokens per step (prefill chunks + decodes)
    max_model_len: int = 4096            # context + output tokens of one sequence
    enable_prefix_caching: bool = True
    num_host_blocks: int = 0             # host pool for offloaded idle-session KV (0: drop instead)
    default_session_ttl_s: float = 600.0 # an idle session older than this is closed
    aging_steps: int = 64                # a turn waiting this many steps jumps to the first class
    preemption: str = "never"            # "never": reserve each turn's worst case (context + max_tokens);
                                         # "swap": reserve context + expected_output_tokens and, when blocks
                                         # run out, swap the youngest running sequence to the host pool
                                         # (resumed later, never recomputed; long chain-of-thought work);
                                         # "recompute" (baseline, benchmarks only): vLLM-style, reserve the
                                         # context only, evict the newest running sequence and recompute it
    expected_output_tokens: int = 1024   # "swap" only: output tokens a turn reserves for at admission
    plan_ahead_after_prefill: bool = False  # async scheduling: also plan the step after a prefill step ahead
                                            # (default: only after pure decode steps; see EngineConfig)
    plan_ahead_admissions: bool = False     # async scheduling: a step planned ahead also takes the ready
                                            # sequences the previous step did not run (restores that landed)
                                            # and admits queued work, instead of waiting for a full schedule
    # Baselines for benchmarks only:
    retain_sessions: bool = True         # False: a session's KV is dropped at the end of each turn

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                     "aging_steps", "expected_output_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SchedulerConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.num_host_blocks, bool) or not isinstance(self.num_host_blocks, int) or self.num_host_blocks < 0:
            raise ValueError(f"SchedulerConfig.num_host_blocks must be an int >= 0, got {self.num_host_blocks!r}")
        if self.preemption not in PREEMPTION_POLICIES:
            raise ValueError(f"SchedulerConfig.preemption must be one of {PREEMPTION_POLICIES}, got {self.preemption!r}")
        if self.preemption == "swap" and self.num_host_blocks == 0:
            raise ValueError("SchedulerConfig.preemption='swap' needs a host pool (num_host_blocks > 0) to swap to")
        if not self.default_session_ttl_s > 0:
            raise ValueError(f"SchedulerConfig.default_session_ttl_s must be > 0, got {self.default_session_ttl_s!r}")

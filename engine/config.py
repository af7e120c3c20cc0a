"""Engine configuration (frozen, validated in __post_init__)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

_DTYPES = ("float32", "bfloat16", "float16")
_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class EngineConfig:
    model: str                                  # Hugging Face model directory, or "smollm2" (the offline instruct model)
    device: str = "cpu"                         # "cpu" | "cuda" | "cuda:N"
    dtype: str = "float32"                      # weights, activations and KV cache
    load_format: str = "safetensors"            # "dummy": random weights from config.json alone (benchmarks)
    block_size: int = 16                        # tokens per KV block
    num_kv_blocks: Optional[int] = None         # None: sized from memory (kv_cache_memory_bytes on CPU,
                                                # gpu_memory_utilization on CUDA)
    max_num_seqs: int = 256                     # sequences running at once
    max_num_batched_tokens: int = 8192          # tokens per step (chunked prefill budget)
    max_model_len: Optional[int] = None         # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    seed: int = 0                               # unseeded sampling draws from a generator seeded with this
    attention_backend: Optional[str] = None     # None: automatic (reference on CPU); or a registered name
    enable_cuda_graphs: bool = True             # CUDA + Triton: replay pure-decode steps from captured graphs
    cuda_graph_max_batch: int = 256             # largest captured decode batch (capped by max_num_seqs)
    cuda_graph_max_tokens: int = 2048           # steps with prefill chunks of up to this many tokens (capped
                                                # by max_num_batched_tokens) replay mixed-step graphs, one per
                                                # token bucket (engine.mixed_graphs); 0: they run eagerly
    decode_gemv: str = "auto"                   # decode batches of 1-4 rows: Triton matrix-vector kernels
                                                # (fused norm / SiLU) or cuBLAS; "auto" measures both at
                                                # graph capture and keeps the faster; "on" | "off" force it
    fp32_lm_head: bool = False                  # bf16/fp16 models: the final norm, the lm_head and the logits
                                                # in float32 over float32 copies of their weights (fewer
                                                # train/inference logprob mismatches; no-op for float32;
                                                # engine.models.fp32_head, docs/gpu.md)
    batch_invariant: bool = False               # every token's logits and logprob bitwise independent of the
                                                # batch, chunking, prefix caching and graphs, and reproducible
                                                # by a trainer's forward (engine.models.invariant_policy):
                                                # fixed-tile matmuls, one attention kernel for every step kind
                                                # (engine.kernels.invariant; CPU: row-wise torch ops); docs/gpu.md
    async_scheduling: bool = True               # queue decode step N+1 before reading step N's tokens
                                                # (see LLMEngine.step, docs/scheduler.md)
    async_after_prefill: bool = True            # ... also after a step with prefill chunks (with mixed-step
                                                # graphs, faster on an H200 in multi_turn, same run: 0.5B 15,409
                                                # vs 12,798 tok/s, 8B 4,119 vs 4,020; docs/scheduler.md)
    async_admissions: bool = True               # ... and let the step queued ahead take the sequences whose
                                                # restores landed and admit queued turns (their restores start
                                                # there), instead of a full schedule after the device drains
                                                # (H200 multi_turn, 2026-12-04: 8B 4,478 vs 4,259 tok/s,
                                                # 0.5B 19,221 vs 15,119 and 15,939 vs 15,435; docs/scheduler.md)
    extend_kv_splits: int = 1                   # CUDA: most KV splits of a tile of the extend attention kernel
                                                # in steps of up to 1,024 tokens (ranges of >= 512 keys, merged:
                                                # engine.kernels.extend_attention); 1 = no split. Off: on an H200 it made
                                                # multi_turn's mixed steps slower (8B 13.6 vs 13.2 ms, 0.5B 3.25
                                                # vs 2.97; benchmarks/mixed_attention.py, 2026-12-02)
    fixed_address_memory: bool = True           # CUDA: the weights, the fp32 head copies and the KV cache in
                                                # driver virtual-memory regions at fixed addresses, so sleep
                                                # unmaps them and wake maps them again where they were: the
                                                # CUDA graphs stay valid (engine.device_memory, engine.sleep);
                                                # False, or where the driver API fails: torch allocations,
                                                # re-allocated at wake and the graphs re-captured (H200: a wake
                                                # of the 8B shape 0.11 s with graphs kept, 0.99-1.39 s without)
    kv_cache_memory_bytes: int = 1 << 30        # CPU KV budget when num_kv_blocks is None
    gpu_memory_utilization: float = 0.9         # CUDA: fraction of device memory for weights + KV
    update_backup_bytes: Optional[int] = None   # CUDA: device memory kept for an update's rollback copy of what
                                                # it overwrites (KV sizing leaves it free; also update_weights'
                                                # default backup budget); None: every parameter's bytes (any
                                                # failure can be undone); 0 suits resident loaders (CUDA IPC)
    host_kv_cache_bytes: Optional[int] = None   # pinned host pool for offloaded KV (idle sessions, swapped
                                                # sequences); None: on CUDA a quarter of available host memory
                                                # (at most the device KV cache and 16 GiB), 0 on CPU;
                                                # 0: under pressure idle sessions' KV is dropped
    session_ttl_s: float = 600.0                # default TTL of an idle session
    preemption: str = "never"                   # "never": reserve each turn's worst case, nothing running is
                                                # ever moved; "swap": reserve for expected_output_tokens and swap
                                                # the youngest running sequence to the host pool when blocks run
                                                # out (long chain-of-thought work); "recompute": the vLLM-style
                                                # baseline (benchmarks only). See scheduler.SchedulerConfig.
    expected_output_tokens: int = 1024          # "swap": output tokens a turn reserves for at admission
    # Scheduling baselines, for benchmarks only (see scheduler.SchedulerConfig):
    retain_sessions: bool = True                # False: re-prefill a session's history every turn

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"EngineConfig.model must be a non-empty path string, got {self.model!r}")
        if not isinstance(self.device, str) or self.device.split(":")[0] not in _DEVICES:
            raise ValueError(f"EngineConfig.device must be one of {_DEVICES} (optionally 'cuda:N'), got {self.device!r}")
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"EngineConfig.load_format must be 'safetensors' or 'dummy', got {self.load_format!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"EngineConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if not isinstance(self.async_after_prefill, bool):
            raise ValueError(f"EngineConfig.async_after_prefill must be a bool, got {self.async_after_prefill!r}")
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(f"EngineConfig.async_scheduling must be a bool, got {self.async_scheduling!r}")
        if self.decode_gemv not in ("auto", "on", "off"):
            raise ValueError(f"EngineConfig.decode_gemv must be 'auto', 'on' or 'off', got {self.decode_gemv!r}")
        if isinstance(self.extend_kv_splits, bool) or not isinstance(self.extend_kv_splits, int) \
                or not 1 <= self.extend_kv_splits <= 16:
            raise ValueError(f"EngineConfig.extend_kv_splits must be an int in [1, 16], got {self.extend_kv_splits!r}")
        if not isinstance(self.fixed_address_memory, bool):
            raise ValueError(f"EngineConfig.fixed_address_memory must be a bool, got {self.fixed_address_memory!r}")
        if not isinstance(self.fp32_lm_head, bool):
            raise ValueError(f"EngineConfig.fp32_lm_head must be a bool, got {self.fp32_lm_head!r}")
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"EngineConfig.batch_invariant must be a bool, got {self.batch_invariant!r}")
        if not isinstance(self.enable_cuda_graphs, bool):
            raise ValueError(f"EngineConfig.enable_cuda_graphs must be a bool, got {self.enable_cuda_graphs!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_bytes",
                     "cuda_graph_max_batch"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.cuda_graph_max_tokens, bool) or not isinstance(self.cuda_graph_max_tokens, int) \
                or self.cuda_graph_max_tokens < 0:
            raise ValueError(f"EngineConfig.cuda_graph_max_tokens must be an int >= 0, got {self.cuda_graph_max_tokens!r}")
        for name in ("num_kv_blocks", "max_model_len"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"EngineConfig.enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"EngineConfig.seed must be an int, got {self.seed!r}")
        if self.host_kv_cache_bytes is not None and (isinstance(self.host_kv_cache_bytes, bool) or not isinstance(
                self.host_kv_cache_bytes, int) or self.host_kv_cache_bytes < 0):
            raise ValueError(f"EngineConfig.host_kv_cache_bytes must be None or an int >= 0, "
                             f"got {self.host_kv_cache_bytes!r}")
        if self.update_backup_bytes is not None and (isinstance(self.update_backup_bytes, bool) or not isinstance(
                self.update_backup_bytes, int) or self.update_backup_bytes < 0):
            raise ValueError(f"EngineConfig.update_backup_bytes must be None or an int >= 0, "
                             f"got {self.update_backup_bytes!r}")
        if self.preemption not in ("never", "swap", "recompute"):
            raise ValueError(f"EngineConfig.preemption must be 'never', 'swap' or 'recompute', got {self.preemption!r}")
        _positive_int("expected_output_tokens", self.expected_output_tokens)
        if not isinstance(self.retain_sessions, bool):
            raise ValueError(f"EngineConfig.retain_sessions must be a bool, got {self.retain_sessions!r}")
        if not (isinstance(self.session_ttl_s, (int, float)) and self.session_ttl_s > 0):
            raise ValueError(f"EngineConfig.session_ttl_s must be > 0, got {self.session_ttl_s!r}")
        if not (0.0 < float(self.gpu_memory_utilization) <= 1.0):
            raise ValueError(f"EngineConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")

    @property
    def mixed_graph_tokens(self) -> int:
        """The largest step with prefill chunks replayed from a graph (0: none): ``cuda_graph_max_tokens`` capped
        by the step budget, 0 without CUDA graphs."""
        return min(self.cuda_graph_max_tokens, self.max_num_batched_tokens) if self.enable_cuda_graphs else 0

    @property
    def fp32_head_in_effect(self) -> bool:
        """``fp32_lm_head`` changes something: the model is bf16 / fp16 (a float32 model's head already is)."""
        return self.fp32_lm_head and self.dtype != "float32"


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"EngineConfig.{name} must be a positive int, got {value!r}")

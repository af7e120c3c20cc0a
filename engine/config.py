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
    block_size: int = 16                        # tokens per KV block
    num_kv_blocks: Optional[int] = None         # None: sized from memory (kv_cache_memory_bytes on CPU,
                                                # gpu_memory_utilization on CUDA)
    max_num_seqs: int = 256                     # sequences running at once
    max_num_batched_tokens: int = 8192          # tokens per step (chunked prefill budget)
    max_model_len: Optional[int] = None         # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    seed: int = 0                               # unseeded sampling draws from a generator seeded with this
    attention_backend: Optional[str] = None     # None: automatic (reference on CPU); or a registered name
    kv_cache_memory_bytes: int = 1 << 30        # CPU KV budget when num_kv_blocks is None
    gpu_memory_utilization: float = 0.9         # CUDA: fraction of device memory for weights + KV

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"EngineConfig.model must be a non-empty path string, got {self.model!r}")
        if not isinstance(self.device, str) or self.device.split(":")[0] not in _DEVICES:
            raise ValueError(f"EngineConfig.device must be one of {_DEVICES} (optionally 'cuda:N'), got {self.device!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"EngineConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_bytes"):
            _positive_int(name, getattr(self, name))
        for name in ("num_kv_blocks", "max_model_len"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"EngineConfig.enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"EngineConfig.seed must be an int, got {self.seed!r}")
        if not (0.0 < float(self.gpu_memory_utilization) <= 1.0):
            raise ValueError(f"EngineConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"EngineConfig.{name} must be a positive int, got {value!r}")

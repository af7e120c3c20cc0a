"""One model on one device: weights, paged KV cache, attention backends, sampling, and the
``LLMEngine`` facade over the scheduler and the model runner.

The names below load on first use (PEP 562), so that ``engine.sampling_params`` (pure Python) can be imported
without torch: the wire protocol and the clients depend on it alone.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"EngineConfig": "engine.config", "LLMEngine": "engine.llm_engine", "Completion": "engine.outputs",
         "SamplingParams": "engine.sampling_params"}

__all__ = ["EngineConfig", "LLMEngine", "Completion", "SamplingParams"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

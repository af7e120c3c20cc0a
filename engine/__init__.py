"""One model on one device: weights, paged KV cache, attention backends, sampling, and the
``LLMEngine`` facade over the scheduler and the model runner."""
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import Completion
from engine.sampling import SamplingParams

__all__ = ["EngineConfig", "LLMEngine", "Completion", "SamplingParams"]

"""The engine with the Triton attention backend equals the reference backend (on CPU the kernels
run under TRITON_INTERPRET=1; on CUDA natively)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is first imported
pytest.importorskip("triton")

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from engine.tiny_models import make_tiny_model  # noqa: E402


def test_triton_backend_engine_matches_reference(tmp_path):
    path = make_tiny_model("qwen2", tmp_path / "m", seed=4, num_hidden_layers=1)
    prompts = [list(range(3, 40)), [7, 8, 9], list(range(50, 71))]
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=None)
    device = "cuda" if torch.cuda.is_available() else "cpu"   # Triton runs natively on CUDA, interpreted on CPU
    ref = LLMEngine(EngineConfig(model=str(path), block_size=16, max_num_batched_tokens=32, device=device,
                                 attention_backend="reference"))
    tri = LLMEngine(EngineConfig(model=str(path), block_size=16, max_num_batched_tokens=32, device=device,
                                 attention_backend="triton"))
    assert tri.backend.name == "triton"
    a, b = ref.generate(prompts, params), tri.generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    for x, y in zip(a, b):
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-4
    tri.check_integrity()


def test_auto_backend_is_the_batched_cpu_one_on_cpu(tmp_path):
    path = make_tiny_model("llama", tmp_path / "m", seed=4)
    assert LLMEngine(EngineConfig(model=str(path))).backend.name == "cpu"
    with pytest.raises(ValueError, match="attention backend"):
        LLMEngine(EngineConfig(model=str(path), attention_backend="nope"))

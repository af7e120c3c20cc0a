"""Shared checkpoints: W1 (what the engine serves) and W2 (the update) of tiny models, plus helpers."""
from __future__ import annotations

import pytest
import torch

from engine.tiny_models import make_tiny_model
from engine.weights import load_model


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """qwen2 (untied, qkv bias) and llama (tied embeddings) at two seeds; W2 also sharded and stored bf16."""
    root = tmp_path_factory.mktemp("ws_ckpt")
    return {
        "w1": make_tiny_model("qwen2", root / "w1", seed=1),
        "w2": make_tiny_model("qwen2", root / "w2", seed=2),
        "w2_sharded": make_tiny_model("qwen2", root / "w2_sharded", seed=2, shards=3),
        "w2_bf16": make_tiny_model("qwen2", root / "w2_bf16", seed=2, dtype="bfloat16"),
        "tied_w1": make_tiny_model("llama", root / "tied_w1", seed=1),
        "tied_w2": make_tiny_model("llama", root / "tied_w2", seed=2),
    }


def load(path):
    return load_model(path, torch.float32, "cpu")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_params_bitwise(model, expected: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    assert params.keys() == expected.keys()
    for name, p in params.items():
        assert torch.equal(_bits(p), _bits(expected[name])), f"parameter {name} differs"


def assert_same_as_fresh(model, path) -> None:
    """Bitwise equal to a fresh ``load_model`` of ``path``."""
    fresh, _ = load(path)
    assert_params_bitwise(model, snapshot(fresh))

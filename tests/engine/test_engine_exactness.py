"""Done-when 1: greedy tokens and logprobs of the engine equal transformers on tiny random models of
every supported architecture, under every scheduling regime (prefix cache on/off, chunked prefill,
a KV pool so small that requests wait)."""
import random

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.tiny_models import TINY_ARCHS, make_tiny_model

NUM_NEW = 64


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(2, vocab) for _ in range(37)]   # two prompts share 2 full blocks + more
    prompts = [[rng.randrange(2, vocab) for _ in range(n)] for n in (1, 5, 16, 17, 33, 60)]
    prompts += [shared + [rng.randrange(2, vocab) for _ in range(3)], shared + [rng.randrange(2, vocab)]]
    return prompts


@pytest.fixture(scope="module", params=TINY_ARCHS)
def tiny(request, tmp_path_factory):
    """(arch, path, prompts, hf greedy outputs, hf model)"""
    from transformers import AutoModelForCausalLM

    arch = request.param
    path = make_tiny_model(arch, tmp_path_factory.mktemp(arch), seed=11)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts(hf.config.vocab_size, seed=5)
    # ignore_eos on our side = no EOS stopping on theirs. (min_new_tokens would instead mask EOS
    # out of the logits and change the argmax.)
    hf.generation_config.eos_token_id = None
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_NEW,
                              do_sample=False, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    return arch, path, prompts, expected, hf


def _hf_logprobs(hf, prompt: list[int], output: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + output])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    # token output[i] is predicted at position len(prompt) - 1 + i
    idx = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(output))
    return lp[idx, torch.tensor(output)]


REGIMES = {
    "prefix_cache": dict(enable_prefix_caching=True),
    "no_prefix_cache": dict(enable_prefix_caching=False),
    "chunked_prefill": dict(max_num_batched_tokens=16, max_num_seqs=4),
    "tiny_pool": dict(num_kv_blocks=20, block_size=8),     # 160 slots; the longest request needs 128
}


@pytest.mark.parametrize("regime", list(REGIMES))
def test_greedy_matches_transformers(tiny, regime):
    arch, path, prompts, expected, hf = tiny
    engine = LLMEngine(EngineConfig(model=str(path), **REGIMES[regime]))
    outs = engine.generate(prompts, SamplingParams(max_tokens=NUM_NEW, ignore_eos=True))
    assert len(outs) == len(prompts)
    for i, (out, exp) in enumerate(zip(outs, expected)):
        assert out.token_ids == exp, f"{arch}/{regime} prompt {i}"
        assert out.finish_reason == "length"
        ref = _hf_logprobs(hf, prompts[i], out.token_ids)
        err = (torch.tensor(out.logprobs, dtype=torch.float64) - ref).abs().max().item()
        assert err < 1e-4, f"{arch}/{regime} prompt {i}: logprob error {err}"
    stats = engine.stats()
    assert stats["preemptions"] == 0
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    engine.check_integrity()
    if regime in ("prefix_cache", "no_prefix_cache"):
        # The two prompts sharing 37 tokens were submitted together: the second waits a step for
        # the first's 2 full blocks (16 tokens each). Run both again: both hit, still exact.
        assert stats["cached_prompt_tokens"] == (32 if regime == "prefix_cache" else 0)
        again = engine.generate(prompts[-2:], SamplingParams(max_tokens=NUM_NEW, ignore_eos=True))
        assert [c.token_ids for c in again] == expected[-2:]
        cached = engine.stats()["cached_prompt_tokens"]
        assert cached == (32 + 64 if regime == "prefix_cache" else 0)
        assert [c.num_cached_tokens for c in again] == ([32, 32] if regime == "prefix_cache" else [0, 0])
    if regime == "tiny_pool":
        assert stats["num_total_blocks"] == 20


@pytest.mark.parametrize("prompt_len", [37, 32], ids=["partial-last-block", "aligned"])
def test_n_samples_logprobs_match_transformers(tiny, prompt_len):
    """n > 1: the prompt is computed once; the siblings' first tokens come from the leader's row and their
    KV continues from a copy of its partial last block. Every sample's logprobs at T = 1 must equal
    transformers' log-softmax over that sample's own context (a wrong copy would show from token 2 on)."""
    arch, path, prompts, _, hf = tiny
    prompt = (prompts[-2] * 2)[:prompt_len]
    engine = LLMEngine(EngineConfig(model=str(path), block_size=16))
    outs = engine.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True))
    assert [c.sample_index for c in outs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in outs}) > 1, "samples at T=1 should differ"
    for c in outs:
        ref = _hf_logprobs(hf, prompt, c.token_ids)
        err = (torch.tensor(c.logprobs, dtype=torch.float64) - ref).abs().max().item()
        assert err < 1e-4, f"{arch} sample {c.sample_index}: logprob error {err}"
    stats = engine.stats()
    assert stats["prefill_tokens"] == prompt_len          # once for the group
    assert stats["cached_prompt_tokens"] == 3 * prompt_len
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    engine.check_integrity()

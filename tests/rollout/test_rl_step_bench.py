"""benchmarks/rl_step.py on the CPU with a tiny random model (SmolLM2's vocabulary and tokenizer): every variant
runs a warm-up and a timed GRPO step on the same episodes, with sane figures and the staleness each promises;
and the baseline's in-process episode loop (benchmarks/hf_episodes.py) produces the pool's trajectories exactly
under greedy sampling on a multi-turn environment."""
import json

import pytest
import torch

from benchmarks.hf_episodes import HFEpisodeConfig, run_hf_episodes
from engine import EngineConfig, SamplingParams
from engine.model_config import ModelConfig
from engine.tiny_models import make_tiny_model
from tests.rollout.pool_helpers import local_pool

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_every_variant_trains_one_step_on_the_same_episodes(tmp_path, smollm2_dir):
    from benchmarks.rl_step import main

    out = tmp_path / "rl_step.json"
    summary = main(["--shape", "tiny", "--questions", "2", "--group-size", "2", "--steps", "1", "--max-tokens", "8",
                    "--worker-cpus", "0.5", "--no-results", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary))
    variants = {v["key"]: v for v in summary["variants"]}
    assert list(variants) == ["sync", "async", "hf"]
    for key, v in variants.items():
        steps = [v["warmup"]] + v["steps"]
        assert [s["step"] for s in steps] == [0, 1], key
        for s in steps:
            assert s["episodes"] == 4, key                              # G x n, every variant alike
            assert 0 < s["model_tokens"] <= 4 * 3 * 8, key              # episodes x max_turns x max_tokens
            assert s["rollout_s"] > 0 and s["train_s"] > 0 and s["step_s"] >= s["train_s"], key
            assert s["prefill_tokens"] > 0, key
            assert s["ratio_dev"] is None or s["ratio_dev"] < 1e-3, key  # fp32 engine: trainer agrees
        assert v["means"]["step_s"] > 0 and v["rollout_tok_s"] > 0, key
    for key in ("sync", "async"):
        for s in [variants[key]["warmup"]] + variants[key]["steps"]:
            assert s["weight_sync_s"] > 0 and s["sync_bytes"] > 0 and s["sync_transport"], key
    # staleness from the per-token versions against the version that trained: sync and the baseline 0, async <= 1
    assert all(s["staleness_max"] == 0 for k in ("sync", "hf") for s in [variants[k]["warmup"]] + variants[k]["steps"])
    assert all(0 <= s["staleness_max"] <= 1 for s in variants["async"]["steps"])
    assert variants["async"]["warmup"]["staleness_max"] == 0          # nothing was submitted before the first push
    assert all(s["sleep_wake_s"] > 0 for s in variants["sync"]["steps"])
    assert all(s["sleep_wake_s"] == 0 for k in ("async", "hf") for s in variants[k]["steps"])
    assert all(s["weight_sync_s"] == 0 for s in variants["hf"]["steps"])
    h = summary["headline"]
    assert set(h) == {"hf_step_over_sync_step", "hf_step_over_async_step", "weight_sync_pct_of_sync_step",
                      "weight_sync_pct_of_async_step"}
    assert all(x > 0 for x in h.values()) and h["weight_sync_pct_of_sync_step"] < 100


@pytest.mark.slow
def test_hf_episodes_reproduce_the_pools_under_greedy(tmp_path):
    """Same environment, same episode rules, same tokens: transformers' greedy generate turn by turn (history
    re-prefilled) against the server-side agent loop (session KV kept), on 3-turn echo_test episodes."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_model("qwen2", tmp_path / "m", seed=3)
    kwargs = [{"seed": s, "prompt_len": 5 + s, "obs_len": 3, "num_steps": 3} for s in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    with local_pool(EngineConfig(model=str(path), block_size=8), num_workers=1) as pool:
        ours = [None] * len(kwargs)
        for i, traj in pool.as_completed(pool.run_episodes_refs("echo_test", kwargs, params, max_turns=3)):
            ours[i] = traj
        version = pool.version
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = HFEpisodeConfig(temperature=0.0, max_tokens=6, max_turns=3,
                          eos_token_ids=tuple(ModelConfig.from_pretrained(str(path)).eos_token_ids), pad_token_id=0,
                          max_model_len=1024)
    model.train()
    theirs = run_hf_episodes(model, None, "echo_test", kwargs, cfg, version)
    assert model.training                                   # sampled in eval mode, handed back as it came
    for a, b in zip(ours, theirs):
        assert (b.prompt_ids, b.token_ids, b.loss_mask, b.versions) == (a.prompt_ids, a.token_ids, a.loss_mask,
                                                                        a.versions)
        assert (b.turns, b.reward, b.finish_reason) == (a.turns, a.reward, a.finish_reason) and b.turns == 3
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
        # the baseline prefilled every turn's whole context; the session kept its KV
        assert b.metrics["num_prefill_tokens"] > a.metrics["num_prefill_tokens"]

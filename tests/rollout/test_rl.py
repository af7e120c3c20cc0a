"""rollout.rl: the trainer's recomputed logprobs equal the engine's behaviour logprobs (ratio 1 at the
first epoch), batching aligns tokens with their logits, GRPO advantages and the PPO loss."""
import math

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.tiny_models import make_tiny_model
from rollout.rl import group_advantages, make_batch, ppo_loss, token_logprobs
from rollout.trajectory import Trajectory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    path = make_tiny_model("qwen2", tmp_path_factory.mktemp("rl"), seed=8)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_recomputed_logprobs_match_engine_multi_turn(tiny):
    path, hf = tiny
    engine = LLMEngine(EngineConfig(model=str(path), block_size=8))
    temperature = 0.8
    params = SamplingParams(temperature=temperature, seed=3, max_tokens=10, ignore_eos=True)
    trajs = []
    for prompt in ([5, 6, 7, 8], list(range(20, 45))):
        sid = engine.open_session()
        t = Trajectory(prompt_ids=list(prompt))
        c = engine.run_turn(sid, prompt, params)
        t.add_model_tokens(c.token_ids, c.logprobs, c.versions)
        t.add_env_tokens([9, 10, 11])                         # an observation: loss mask 0
        c = engine.run_turn(sid, [9, 10, 11], params)
        t.add_model_tokens(c.token_ids, c.logprobs, c.versions)
        trajs.append(t)
    batch = make_batch(trajs, [1.0, -1.0], pad_id=0)
    with torch.no_grad():
        new_lp = token_logprobs(hf, batch, temperature)
    out = ppo_loss(new_lp, batch, new_lp, clip_eps=0.2, kl_coef=0.1)
    assert out.ratio_abs_dev < 1e-4 and out.clip_frac == 0.0 and out.kl == pytest.approx(0.0, abs=1e-7)
    # independent per-token check of the alignment for the first trajectory
    t = trajs[0]
    seq = torch.tensor([t.prompt_ids + t.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(hf(seq).logits[0].float() / temperature, -1)
    for j, (tok, m) in enumerate(zip(t.token_ids, t.loss_mask)):
        pos = len(t.prompt_ids) + j - 1
        if m:
            assert abs(lp[pos, tok].item() - t.logprobs[j]) < 1e-4
            assert abs(new_lp[0, pos].item() - t.logprobs[j]) < 1e-4
        assert batch.loss_mask[0, pos].item() == m
    assert batch.loss_mask.sum().item() == sum(sum(t.loss_mask) for t in trajs)


def test_group_advantages():
    adv = group_advantages([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5], group_size=4)
    assert adv[:4] == pytest.approx([1, -1, 1, -1], abs=1e-3)
    assert adv[4:] == [0.0] * 4
    with pytest.raises(AssertionError):
        group_advantages([1.0, 2.0, 3.0], group_size=2)


def test_ppo_loss_clipping_and_sign():
    t = Trajectory(prompt_ids=[1, 2], token_ids=[3, 4], logprobs=[-1.0, -1.0], loss_mask=[1, 1], versions=[0, 0])
    batch = make_batch([t], [2.0], pad_id=0)
    mask = batch.loss_mask.bool()
    new_lp = batch.old_logprobs.clone()
    new_lp[mask] += math.log(1.5)                      # ratio 1.5 > 1 + eps: clipped for positive advantage
    out = ppo_loss(new_lp, batch, new_lp, clip_eps=0.2, kl_coef=0.0)
    assert out.policy_loss == pytest.approx(-1.2 * 2.0, rel=1e-5) and out.clip_frac == 1.0

"""rollout.rl: the trainer's recomputed logprobs equal the engine's behaviour logprobs (ratio 1 at the
first epoch), batching aligns tokens with their logits and versions, GRPO advantages, the PPO loss with and
without truncated importance sampling (against per-token hand computations), staleness from versions."""
import math

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.tiny_models import make_tiny_model
from rollout.rl import (Staleness, behaviour_mismatch, group_advantages, make_batch, ppo_loss, staleness,
                        token_logprobs)
from rollout.trajectory import ENV_VERSION, Trajectory


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
    # versions line up with the tokens: the engine's version on model tokens, ENV_VERSION on observations/padding
    for i, t in enumerate(trajs):
        for j, v in enumerate(t.versions):
            assert batch.versions[i, len(t.prompt_ids) + j - 1].item() == v
    assert set(batch.versions[batch.loss_mask.bool()].tolist()) == {0}
    assert (batch.versions[~batch.loss_mask.bool()] == ENV_VERSION).all()
    mismatch = behaviour_mismatch(new_lp, batch, current_version=0)
    assert mismatch.num_tokens == batch.loss_mask.sum().item() and mismatch.abs_dev < 1e-4
    assert mismatch.abs_dev <= mismatch.max_abs_dev < 1e-3
    assert behaviour_mismatch(new_lp, batch, current_version=1).num_tokens == 0     # every token stale


def test_mismatch_mean_and_max_by_hand():
    t = Trajectory(prompt_ids=[1, 2], token_ids=[3, 4, 5], logprobs=[-1.0, -2.0, -0.5], loss_mask=[1, 0, 1],
                   versions=[3, ENV_VERSION, 3])
    batch = make_batch([t], [1.0], pad_id=0)
    trainer = torch.zeros_like(batch.loss_mask)
    # positions 1, 3 hold the model tokens (prompt length 2 -> first target at position 1)
    trainer[0, 1] = -1.0 + math.log(1.5)        # ratio 1.5
    trainer[0, 3] = -0.5 + math.log(0.9)        # ratio 0.9
    m = behaviour_mismatch(trainer, batch, current_version=3)
    assert m.num_tokens == 2
    assert m.abs_dev == pytest.approx((0.5 + 0.1) / 2, rel=1e-5)
    assert m.max_abs_dev == pytest.approx(0.5, rel=1e-5)


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
    new_lp = batch.behaviour_logprobs.clone()
    new_lp[mask] += math.log(1.5)                      # ratio 1.5 > 1 + eps: clipped for positive advantage
    out = ppo_loss(new_lp, batch, new_lp, clip_eps=0.2, kl_coef=0.0)
    assert out.policy_loss == pytest.approx(-1.2 * 2.0, rel=1e-5) and out.clip_frac == 1.0


def _tis_case():
    """Two trajectories: model tokens of two versions, an observation (mask 0) between model turns and
    padding, with behaviour/old logprobs far enough apart that some TIS weights exceed the cap."""
    a = Trajectory(prompt_ids=[1, 2, 3])
    a.add_model_tokens([4, 5, 6], [-0.5, -2.0, -1.0], [3, 3, 3])
    a.add_env_tokens([7, 8])
    a.add_model_tokens([9, 10], [-3.0, -0.2], [4, 4])
    b = Trajectory(prompt_ids=[1, 2])
    b.add_model_tokens([11, 12], [-1.5, -0.7], [4, 4])
    batch = make_batch([a, b], [1.5, -0.8], pad_id=0)
    gen = torch.Generator().manual_seed(5)
    shape = batch.loss_mask.shape
    # old: the trainer's recomputation (within ~1.5 nats of the behaviour logprobs); junk off the mask,
    # where any use of it would show in the loss
    old_lp = batch.behaviour_logprobs + torch.empty(shape).uniform_(-1.5, 1.5, generator=gen)
    new_lp = old_lp + torch.empty(shape).uniform_(-0.4, 0.4, generator=gen)
    ref_lp = old_lp + torch.empty(shape).uniform_(-0.3, 0.3, generator=gen)
    off = ~batch.loss_mask.bool()
    for t, junk in ((old_lp, 50.0), (new_lp, 49.0), (ref_lp, 47.0)):
        t[off] = junk
    batch.advantages[off] = 3.0      # make_batch zeroes them; junk here checks the loss masks on its own
    return batch, old_lp, new_lp.requires_grad_(True), ref_lp


def _hand_loss(batch, old_lp, new_lp, ref_lp, clip_eps, kl_coef, cap):
    """Per-token loop in plain Python floats: -mean(w * min(r A, clip(r) A)) + kl_coef * mean(k3), with
    w = min(exp(old - behaviour), cap), r = exp(new - old), over model tokens only; and d loss / d new_lp."""
    new_lp, old_lp = new_lp.detach(), old_lp.detach()     # plain numbers from here on
    items = [(i, t) for i in range(batch.loss_mask.shape[0]) for t in range(batch.loss_mask.shape[1])
             if batch.loss_mask[i, t].item() == 1.0]
    n = len(items)
    pg = kl = 0.0
    grad = torch.zeros(batch.loss_mask.shape, dtype=torch.float64)
    capped = 0
    for i, t in items:
        new, old, ref = float(new_lp[i, t]), float(old_lp[i, t]), float(ref_lp[i, t])
        behaviour, adv = float(batch.behaviour_logprobs[i, t]), float(batch.advantages[i, t])
        w_raw = math.exp(old - behaviour)
        w = min(w_raw, cap)
        capped += w_raw > cap
        r = math.exp(new - old)
        r_clip = min(max(r, 1 - clip_eps), 1 + clip_eps)
        unclipped_is_min = r * adv <= r_clip * adv
        pg += -w * min(r * adv, r_clip * adv) / n
        kl += (math.exp(ref - new) - (ref - new) - 1) / n
        # d/dnew: the surrogate's gradient flows only through the unclipped branch when it is the min
        grad[i, t] = (-w * r * adv if unclipped_is_min else 0.0) / n + kl_coef * (1 - math.exp(ref - new)) / n
    return pg, kl, grad, capped / n


@pytest.mark.parametrize("cap", [1.5, 4.0])
def test_tis_loss_matches_hand_computation(cap):
    batch, old_lp, new_lp, ref_lp = _tis_case()
    out = ppo_loss(new_lp, batch, ref_lp, clip_eps=0.2, kl_coef=0.05, old_lp=old_lp, tis_cap=cap)
    out.loss.backward()
    pg, kl, grad, capped_frac = _hand_loss(batch, old_lp, new_lp, ref_lp, 0.2, 0.05, cap)
    assert out.policy_loss == pytest.approx(pg, rel=1e-5)
    assert out.kl == pytest.approx(kl, rel=1e-5)
    assert out.loss.item() == pytest.approx(pg + 0.05 * kl, rel=1e-5)
    assert out.tis_capped_frac == pytest.approx(capped_frac)
    torch.testing.assert_close(new_lp.grad.double(), grad, rtol=1e-5, atol=1e-7)
    assert new_lp.grad[~batch.loss_mask.bool()].abs().max() == 0.0      # nothing leaks from masked positions
    if cap == 1.5:
        assert 0 < capped_frac < 1      # the case exercises the cap: some weights truncated, some not


def test_tis_first_epoch_old_is_new():
    """At the first epoch the example passes old_lp = new_lp (one forward): the ratio is 1 and must stay a
    constant, so d loss / d new = -w A / n on model tokens, as the hand computation with old = new says."""
    batch, _, new_lp, ref_lp = _tis_case()
    out = ppo_loss(new_lp, batch, ref_lp, clip_eps=0.2, kl_coef=0.0, old_lp=new_lp, tis_cap=1.5)
    out.loss.backward()
    pg, _, grad, _ = _hand_loss(batch, new_lp, new_lp, ref_lp, 0.2, 0.0, 1.5)
    assert out.ratio_abs_dev == 0.0 and out.clip_frac == 0.0
    assert out.policy_loss == pytest.approx(pg, rel=1e-5)
    torch.testing.assert_close(new_lp.grad.double(), grad, rtol=1e-5, atol=1e-7)


def test_tis_cap_changes_the_loss_and_off_means_the_behaviour_ratio():
    batch, old_lp, new_lp, ref_lp = _tis_case()
    tight = ppo_loss(new_lp, batch, ref_lp, 0.2, 0.0, old_lp=old_lp, tis_cap=1.0)
    loose = ppo_loss(new_lp, batch, ref_lp, 0.2, 0.0, old_lp=old_lp, tis_cap=1e9)
    assert tight.policy_loss != pytest.approx(loose.policy_loss, rel=1e-3)
    assert tight.tis_weight_mean <= 1.0 < loose.tis_weight_mean
    # TIS off: the ratio is new over behaviour, weights are 1 — the hand loss with old = behaviour, cap inf
    off = ppo_loss(new_lp, batch, ref_lp, 0.2, 0.0)
    pg, _, _, _ = _hand_loss(batch, batch.behaviour_logprobs, new_lp, ref_lp, 0.2, 0.0, math.inf)
    assert off.policy_loss == pytest.approx(pg, rel=1e-5)
    assert off.tis_weight_mean == 1.0 and off.tis_capped_frac == 0.0


def test_tis_bad_input():
    batch, old_lp, new_lp, ref_lp = _tis_case()
    with pytest.raises(ValueError, match="TIS needs both"):
        ppo_loss(new_lp, batch, ref_lp, 0.2, 0.0, tis_cap=2.0)                  # cap without old_lp
    with pytest.raises(ValueError, match="TIS needs both"):
        ppo_loss(new_lp, batch, ref_lp, 0.2, 0.0, old_lp=old_lp)                # old_lp without a cap
    with pytest.raises(ValueError, match="tis_cap must be"):
        ppo_loss(new_lp, batch, ref_lp, 0.2, 0.0, old_lp=old_lp, tis_cap=-1.0)
    with pytest.raises(ValueError, match="old_lp has shape"):
        ppo_loss(new_lp, batch, ref_lp, 0.2, 0.0, old_lp=old_lp[:, :-1], tis_cap=2.0)


def test_staleness_from_versions():
    batch, _, _, _ = _tis_case()
    # model tokens: three of version 3, four of version 4; the observation and padding are ignored
    assert staleness(batch.versions, batch.loss_mask, 4) == Staleness(max=1, mean=3 / 7, num_tokens=7)
    assert staleness(batch.versions, batch.loss_mask, 6) == Staleness(max=3, mean=(3 * 3 + 4 * 2) / 7, num_tokens=7)
    assert staleness(batch.versions, torch.zeros_like(batch.loss_mask), 4) == Staleness(0, 0.0, 0)
    with pytest.raises(ValueError, match="newer than the trainer's 3"):
        staleness(batch.versions, batch.loss_mask, 3)
    bad = batch.versions.clone()
    bad[tuple(batch.loss_mask.bool().nonzero()[0].tolist())] = ENV_VERSION        # a model token without a version
    with pytest.raises(ValueError, match="negative version"):
        staleness(bad, batch.loss_mask, 4)
    with pytest.raises(ValueError, match="current_version"):
        staleness(batch.versions, batch.loss_mask, True)
    with pytest.raises(ValueError, match="integer tensor"):
        staleness(batch.versions.float(), batch.loss_mask, 4)


def test_make_batch_bad_input():
    t = Trajectory(prompt_ids=[1], token_ids=[2], logprobs=[-1.0], loss_mask=[1], versions=[0])
    with pytest.raises(ValueError, match="1 trajectories but 2 advantages"):
        make_batch([t], [1.0, 2.0], pad_id=0)
    with pytest.raises(ValueError, match="empty prompt_ids"):
        make_batch([Trajectory(prompt_ids=[], token_ids=[2], logprobs=[-1.0], loss_mask=[1], versions=[0])], [1.0], 0)
    with pytest.raises(ValueError, match="not finite"):
        make_batch([t], [float("nan")], pad_id=0)

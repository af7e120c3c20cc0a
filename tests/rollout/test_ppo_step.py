"""rollout.ppo_step.train_step on a tiny model with the engine's trajectories: the first epoch's ratio to the
engine's behaviour logprobs is 1 (same weights), the KL to an identical reference starts at 0, each epoch is
one optimizer step that moves the weights in the direction of the advantages, and bad configs are refused."""
import copy
import dataclasses

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.tiny_models import make_tiny_model
from rollout.ppo_step import PPOStepConfig, train_step
from rollout.rl import make_batch, token_logprobs
from rollout.trajectory import Trajectory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    path = make_tiny_model("llama", tmp_path_factory.mktemp("ppo_step"), seed=4)
    engine = LLMEngine(EngineConfig(model=str(path), block_size=8))
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=6, ignore_eos=True, n=1)
    trajs = []
    for i in range(4):
        out = engine.generate([[3 + i, 9, 11, 17]], dataclasses.replace(params, seed=i))[0]
        trajs.append(Trajectory(prompt_ids=[3 + i, 9, 11, 17], token_ids=list(out.token_ids),
                                logprobs=list(out.logprobs), loss_mask=[1] * len(out.token_ids),
                                versions=list(out.versions)))
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return policy, trajs


def test_train_step_first_epoch_is_on_policy_and_moves_towards_advantages(setup):
    base, trajs = setup
    policy = copy.deepcopy(base)
    reference = copy.deepcopy(base).eval()
    advantages = [1.0, -1.0, 1.0, -1.0]
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    cfg = PPOStepConfig(epochs=2, minibatch=3, clip=10.0, kl_coef=0.0)
    batch = make_batch(trajs, advantages, pad_id=0)
    with torch.no_grad():
        before = token_logprobs(policy, batch, 1.0)
    stats = train_step(policy, reference, opt, None, trajs, advantages, cfg, pad_id=0,
                       device=torch.device("cpu"), version=0)
    assert stats.mismatch_tokens == sum(len(t.token_ids) for t in trajs)
    assert stats.first_epoch_ratio_abs_dev < 1e-4 and stats.first_epoch_ratio_max_dev < 1e-3
    assert stats.kl_epochs[0] == pytest.approx(0.0, abs=1e-7)
    assert len(stats.grad_norms) == len(stats.lrs) == 2 and stats.update_norm > 0
    with torch.no_grad():
        after = token_logprobs(policy, batch, 1.0)
    gain = ((after - before) * batch.loss_mask).sum(dim=1)      # per trajectory: log-likelihood change
    assert gain[0] > 0 and gain[2] > 0 and gain[1] < 0 and gain[3] < 0


def test_bf16_autocast_trains_in_bf16_and_keeps_fp32_logprobs(setup):
    """Mixed precision: the matmuls run in bf16 (so the first-epoch ratio is no longer 1 to fp32 rounding, but
    close), the logprobs and the fp32 master weights stay fp32, and the step still moves towards the advantages."""
    base, trajs = setup
    policy = copy.deepcopy(base)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    cfg = PPOStepConfig(epochs=1, minibatch=4, clip=10.0, kl_coef=0.0, autocast_dtype="bfloat16")
    batch = make_batch(trajs, [1.0, -1.0, 1.0, -1.0], pad_id=0)
    with torch.no_grad():
        before = token_logprobs(policy, batch, 1.0)
    seen = []
    hook = policy.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    stats = train_step(policy, copy.deepcopy(base), opt, None, trajs, [1.0, -1.0, 1.0, -1.0], cfg, pad_id=0,
                       device=torch.device("cpu"), version=0)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    assert 1e-5 < stats.first_epoch_ratio_abs_dev < 0.1       # bf16 compute against fp32 behaviour logprobs
    with torch.no_grad():
        after = token_logprobs(policy, batch, 1.0)
    gain = ((after - before) * batch.loss_mask).sum(dim=1)
    assert gain[0] > 0 and gain[2] > 0 and gain[1] < 0 and gain[3] < 0


def test_stale_tokens_are_left_out_of_the_mismatch(setup):
    base, trajs = setup
    policy = copy.deepcopy(base)
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    stats = train_step(policy, copy.deepcopy(base), opt, None, trajs, [0.0] * 4, PPOStepConfig(epochs=1),
                       pad_id=0, device=torch.device("cpu"), version=1)
    assert stats.mismatch_tokens == 0 and stats.first_epoch_ratio_abs_dev is None


@pytest.mark.parametrize("field,value", [("epochs", 0), ("minibatch", 1.5), ("clip", -0.1), ("temperature", 0.0),
                                         ("tis_cap", float("nan")), ("autocast_dtype", "bf16")])
def test_bad_config_is_refused(field, value):
    with pytest.raises(ValueError, match=f"PPOStepConfig.{field}"):
        PPOStepConfig(**{field: value})


def test_empty_step_is_refused(setup):
    base, _ = setup
    with pytest.raises(ValueError, match="at least one trajectory"):
        train_step(base, base, torch.optim.SGD(base.parameters(), lr=0.1), None, [], [], PPOStepConfig(),
                   pad_id=0, device=torch.device("cpu"), version=0)

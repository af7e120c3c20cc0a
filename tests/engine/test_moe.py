"""Qwen3-MoE (engine.models.moe) against transformers' own forward on tiny random models: expert counts, top-k 1, 2
and 8, with and without renormalised weights, dense and sparse layers mixed; greedy tokens and logprobs within
1e-4 under prefix caching and chunked prefill, across session turns, and for n > 1 samples (their logprobs
teacher-forced through transformers). Weight updates W1 -> W2, from checkpoint names or from transformers 5's fused
in-memory expert tensors (what a trainer's named_parameters push), equal a fresh engine on W2.

Qwen2-MoE (a shared expert, qkv bias) runs the same checks. The ``qwen3_moe`` and ``qwen2_moe`` tiny architectures
also run every test parametrized over engine.tiny_models.TINY_ARCHS
(test_engine_exactness.py, test_model.py, test_weights.py).
"""
import contextlib

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.tiny_models import make_tiny_model

TOL = 1e-4
PROMPTS = [[3], [5, 6, 7, 8, 9, 10, 11], list(range(40, 77)), list(range(100, 140)) + [7] * 9]
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)

VARIANTS = {   # name: (tiny architecture, config overrides)
    "8x2-renorm": ("qwen3_moe", dict()),
    "4x1": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=1, norm_topk_prob=False)),
    "16x8": ("qwen3_moe", dict(num_experts=16, num_experts_per_tok=8, norm_topk_prob=True)),
    "8x2-no-renorm-all-sparse": ("qwen3_moe", dict(norm_topk_prob=False, mlp_only_layers=[])),
    "sparse-step-2": ("qwen3_moe", dict(decoder_sparse_step=2, mlp_only_layers=[], num_hidden_layers=3)),
    "shared-expert-8x2": ("qwen2_moe", dict()),
    "shared-expert-4x1-renorm-dense-first": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=1,
                                                                norm_topk_prob=True, mlp_only_layers=[0])),
}


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logprobs(hf, tokens: list[int], start: int) -> torch.Tensor:
    """log p(tokens[t] | tokens[:t]) for t >= start, from one transformers forward."""
    with torch.no_grad():
        logits = hf(torch.tensor([tokens])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    idx = torch.arange(start - 1, len(tokens) - 1)
    return lp[idx, torch.tensor(tokens[start:])]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_completion(hf, c) -> None:
    want = hf_logprobs(hf, c.prompt_token_ids + c.token_ids, len(c.prompt_token_ids))
    got = torch.tensor(c.logprobs, dtype=torch.float64)
    assert (got - want).abs().max().item() < TOL, (got - want).abs().max().item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_matches_transformers(variant, tmp_path):
    arch, overrides = VARIANTS[variant]
    path = make_tiny_model(arch, tmp_path / variant, seed=7, **overrides)
    hf = hf_model(path)
    from engine.model_config import ModelConfig
    mc = ModelConfig.from_pretrained(path)
    dense = [i for i in range(mc.num_layers) if i not in mc.moe_layers]
    assert mc.moe_layers and (variant != "8x2-renorm" or dense == [0])
    expected = [hf_greedy(hf, p, GREEDY.max_tokens) for p in PROMPTS]
    for regime in (dict(), dict(enable_prefix_caching=False), dict(max_num_batched_tokens=16, max_num_seqs=3)):
        eng = LLMEngine(EngineConfig(model=str(path), **regime))
        outs = eng.generate(PROMPTS + PROMPTS[2:3], GREEDY)        # a repeat: a prefix-cache hit
        for c, want in zip(outs, expected + expected[2:3]):
            assert c.token_ids == want, regime
            check_completion(hf, c)
        eng.check_integrity()


def test_sessions_and_samples_match_transformers(tmp_path):
    path = make_tiny_model("qwen3_moe", tmp_path / "m", seed=8)
    hf = hf_model(path)
    eng = LLMEngine(EngineConfig(model=str(path), max_num_batched_tokens=24))
    sid = eng.open_session()
    first = eng.run_turn(sid, PROMPTS[2], GREEDY)
    second = eng.run_turn(sid, [9, 8, 7, 6], GREEDY)        # an observation, then the model's next turn
    history = eng.session_tokens(sid)
    assert history[-len(second.token_ids):] == second.token_ids
    start = len(history) - len(second.token_ids)
    assert second.token_ids == hf_greedy(hf, history[:start], len(second.token_ids))
    want = hf_logprobs(hf, history, start)
    assert (torch.tensor(second.logprobs, dtype=torch.float64) - want).abs().max().item() < TOL
    check_completion(hf, first)
    samples = eng.generate([PROMPTS[3]], SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=12, ignore_eos=True))
    assert len(samples) == 3 and len({tuple(s.token_ids) for s in samples}) > 1
    for s in samples:
        check_completion(hf, s)
    eng.check_integrity()


@pytest.mark.parametrize("arch,names,transport", [
    ("qwen3_moe", "checkpoint", "state dict"), ("qwen3_moe", "transformers-5 fused", "state dict"),
    ("qwen3_moe", "transformers-5 fused", "buckets"), ("qwen3_moe", "transformers-5 fused", "resident buckets"),
    ("qwen2_moe", "transformers-5 fused", "buckets")])
def test_weight_update_equals_a_fresh_engine(arch, names, transport, tmp_path):
    from safetensors.torch import load_file

    from tests.weight_sync.test_bucketed_update import PackedBuckets
    from weight_sync import StateDictLoader

    w1 = make_tiny_model(arch, tmp_path / "w1", seed=1)
    w2 = make_tiny_model(arch, tmp_path / "w2", seed=2)
    if names == "checkpoint":
        state = load_file(str(w2 / "model.safetensors"))           # experts.{e}.gate_proj.weight, ...
        assert any(".experts.0.gate_proj." in n for n in state)
    else:
        state = {n: p.detach() for n, p in hf_model(w2).named_parameters()}   # experts.gate_up_proj [E, 2I, H]
        assert any(n.endswith("experts.gate_up_proj") for n in state)
    eng = LLMEngine(EngineConfig(model=str(w1)))
    before = eng.generate(PROMPTS, GREEDY)
    if transport == "state dict":
        loader = StateDictLoader(state)
    else:   # packed into byte buckets as a trainer's sender packs them (3-D expert tensors included)
        loader = PackedBuckets(state, bucket_bytes=64 << 10, resident=transport == "resident buckets")
    eng.update_weights(loader, version=1)
    got = eng.generate(PROMPTS, GREEDY)
    fresh = LLMEngine(EngineConfig(model=str(w2))).generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in got] == [c.token_ids for c in fresh] != [c.token_ids for c in before]
    assert [c.logprobs for c in got] == [c.logprobs for c in fresh]


def test_bad_expert_weights_are_refused_before_any_write(tmp_path):
    from engine.weight_update import WeightUpdateError
    from weight_sync import StateDictLoader

    w1 = make_tiny_model("qwen3_moe", tmp_path / "w1", seed=1)
    eng = LLMEngine(EngineConfig(model=str(w1)))
    before = eng.generate(PROMPTS[:2], GREEDY)
    bad = {"model.layers.1.mlp.experts.3.down_proj.weight": torch.zeros(64, 47)}   # I is 48
    with pytest.raises(WeightUpdateError, match=r"experts\.3\.down_proj.*shape"):
        eng.update_weights(StateDictLoader(bad), version=1, mode="keep")
    unknown = {"model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(48, 64)}   # experts 0..7
    with pytest.raises(WeightUpdateError, match="unknown weight"):
        eng.update_weights(StateDictLoader(unknown), version=1, mode="keep")
    assert [c.token_ids for c in eng.generate(PROMPTS[:2], GREEDY)] == [c.token_ids for c in before]
    with pytest.raises(ValueError, match="mixture-of-experts"):
        LLMEngine(EngineConfig(model=str(w1), batch_invariant=True))


# ------------------------------------------------------------------------------------------- routed experts
def hf_routing(hf, tokens: list[int]) -> torch.Tensor:
    """The experts transformers' own forward routes each position to: [S, MoE layers, k]."""
    from rollout.routing_replay import _moe_blocks

    seen = []
    hooks = [b.gate.register_forward_hook(lambda mod, args, out: seen.append(out[2])) for b in _moe_blocks(hf)]
    try:
        with torch.no_grad():
            hf(torch.tensor([tokens]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(seen, dim=1)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_routed_experts_are_the_ones_transformers_picks(arch, tmp_path):
    path = make_tiny_model(arch, tmp_path / "m", seed=9, mlp_only_layers=[], num_hidden_layers=3)
    hf = hf_model(path)
    eng = LLMEngine(EngineConfig(model=str(path), max_num_batched_tokens=20))
    routed = SamplingParams(max_tokens=10, ignore_eos=True, return_routed_experts=True)
    outs = eng.generate(PROMPTS + PROMPTS[2:3], routed)           # the repeat's prompt comes from the prefix cache
    outs += eng.generate([PROMPTS[3]], SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=9, ignore_eos=True,
                                                      return_routed_experts=True))
    sid = eng.open_session()
    eng.run_turn(sid, PROMPTS[1], routed)
    outs.append(eng.run_turn(sid, [4, 4, 2], routed))            # the whole history, the first turn's included
    assert outs[-1].prompt_token_ids == eng.session_tokens(sid)[:len(outs[-1].prompt_token_ids)]
    for c in outs:
        tokens = c.prompt_token_ids + c.token_ids
        got = c.routed_experts.as_tensor()
        assert got.shape == (len(tokens) - 1, 3, 2) and c.routed_experts.dtype == "uint8"
        assert torch.equal(got, hf_routing(hf, tokens)[:len(tokens) - 1])
    assert eng.generate([PROMPTS[1]], GREEDY)[0].routed_experts is None        # not asked
    eng.check_integrity()


def test_replay_makes_the_ratio_one_where_free_routing_does_not(tmp_path):
    """Experts 0 and 1 tie exactly in the trainer's router (equal rows) and are apart by 1e-6 in the engine's: a
    stand-in for the last-bit differences that make a trainer route some tokens elsewhere. Free routing then puts
    those tokens through another expert in the trainer's forward; replay puts them through the engine's."""
    import shutil

    from safetensors.torch import load_file, save_file

    from rollout.routing_replay import replay_routing

    base = make_tiny_model("qwen3_moe", tmp_path / "base", seed=10, mlp_only_layers=[], num_experts=4)
    sd = load_file(str(base / "model.safetensors"))
    noise = torch.Generator().manual_seed(0)
    trainer_sd, engine_sd = dict(sd), dict(sd)
    for name, w in sd.items():
        if name.endswith("mlp.gate.weight"):
            tied = w.clone()
            tied[1] = tied[0]
            trainer_sd[name] = tied
            apart = tied.clone()
            apart[1] += 1e-6 * torch.randn(apart.shape[1], generator=noise)
            engine_sd[name] = apart
    dirs = {}
    for name, state in (("trainer", trainer_sd), ("engine", engine_sd)):
        dirs[name] = shutil.copytree(base, tmp_path / name)
        save_file(state, str(dirs[name] / "model.safetensors"), metadata={"format": "pt"})
    eng = LLMEngine(EngineConfig(model=str(dirs["engine"])))
    outs = eng.generate(PROMPTS, SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True,
                                                return_routed_experts=True))
    hf = hf_model(dirs["trainer"])

    def max_ratio_dev(replay: bool) -> float:
        worst = 0.0
        for c in outs:
            tokens = c.prompt_token_ids + c.token_ids
            ctx = replay_routing(hf, [c.routed_experts.as_tensor()]) if replay else contextlib.nullcontext()
            with ctx:
                lp = hf_logprobs(hf, tokens, len(c.prompt_token_ids))
            ratio = torch.exp(lp - torch.tensor(c.logprobs, dtype=torch.float64))
            worst = max(worst, (ratio - 1).abs().max().item())
        return worst

    free, replayed = max_ratio_dev(False), max_ratio_dev(True)
    assert free > 1e-2, f"free routing should disagree somewhere (max |ratio - 1| {free:.2e})"
    assert replayed < 1e-4, f"replay: max |ratio - 1| {replayed:.2e}"


def test_routed_experts_requests_and_wire_format_are_checked(tmp_path):
    import numpy as np

    from engine.routing import RoutedExperts

    dense = make_tiny_model("llama", tmp_path / "dense", seed=1)
    with pytest.raises(ValueError, match="return_routed_experts.*no mixture-of-experts"):
        LLMEngine(EngineConfig(model=str(dense))).generate([[1, 2]], SamplingParams(return_routed_experts=True))
    with pytest.raises(ValueError, match="return_routed_experts must be a bool"):
        SamplingParams(return_routed_experts=1)
    ids = np.arange(2 * 3 * 2).reshape(2, 3, 2) % 300
    r = RoutedExperts.from_array(ids, num_experts=300)
    assert r.dtype == "uint16" and torch.equal(RoutedExperts.from_wire(r.to_wire()).as_tensor(), torch.from_numpy(ids))
    with pytest.raises(ValueError, match="do not hold"):
        RoutedExperts.from_wire({**r.to_wire(), "data": r.data[:-1]})


def test_trajectories_carry_routing_to_the_trainers_logprobs(tmp_path):
    """Completion -> Trajectory (msgpack round trip) -> rl.make_batch -> rl.token_logprobs replays the routing: the
    same logprobs as replaying it by hand, and the engine's to 1e-4."""
    import msgpack

    from rollout.loop_results import completion_to_trajectory
    from rollout.rl import make_batch, token_logprobs
    from rollout.routing_replay import replay_routing
    from rollout.trajectory import Trajectory

    path = make_tiny_model("qwen3_moe", tmp_path / "m", seed=12)
    eng = LLMEngine(EngineConfig(model=str(path)))
    outs = eng.generate(PROMPTS[1:3], SamplingParams(temperature=1.0, seed=1, max_tokens=8, ignore_eos=True,
                                                     return_routed_experts=True))
    trajs = [Trajectory.from_dict(msgpack.unpackb(msgpack.packb(completion_to_trajectory(c).to_dict()),
                                                  strict_map_key=False)) for c in outs]
    assert all(t.routed_experts_tensor().shape == (len(t.prompt_ids) + len(t.token_ids) - 1, 1, 2) for t in trajs)
    with pytest.raises(ValueError, match="covers"):
        Trajectory(prompt_ids=[1, 2], token_ids=[3], logprobs=[0.0], loss_mask=[1], versions=[0],
                   routed_experts=trajs[0].routed_experts)
    batch = make_batch(trajs, [1.0, -1.0], pad_id=0)
    hf = hf_model(path)
    with torch.no_grad():
        got = token_logprobs(hf, batch, 1.0)
        with replay_routing(hf, batch.routed_experts):
            logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    want = torch.log_softmax(logits, -1).gather(-1, batch.targets[..., None]).squeeze(-1) * batch.loss_mask
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    mask = batch.loss_mask.bool()
    assert (got[mask] - batch.behaviour_logprobs[mask]).abs().max() < TOL


def test_a_session_trajectory_carries_its_whole_routing(tmp_path):
    """Through the EngineLoop (what the Ray worker and the ZeroMQ server run): a two-turn session's trajectory has
    routing for its whole history, the transformers routing of those tokens; the per-turn trajectories carry none."""
    from rollout.engine_loop import EngineLoop

    path = make_tiny_model("qwen3_moe", tmp_path / "m", seed=13)
    loop = EngineLoop(EngineConfig(model=str(path)))
    try:
        params = SamplingParams(max_tokens=6, ignore_eos=True, return_routed_experts=True)
        sid = loop.open_session().result(30)
        turns = [loop.step_session(sid, PROMPTS[2], params).result(30),
                 loop.step_session(sid, [9, 9, 9], params).result(30)]
        whole = loop.close_session(sid).result(30)
    finally:
        loop.shutdown()
    assert all(t.routed_experts is None for t in turns) and whole.turns == 2
    tokens = whole.prompt_ids + whole.token_ids
    assert torch.equal(whole.routed_experts_tensor(), hf_routing(hf_model(path), tokens)[:len(tokens) - 1])


def test_routing_survives_an_offload_and_restore(tmp_path):
    """A KV pool too small for every session's history: idle sessions go to the host pool and come back for their
    next turn; their routing rows travel with the blocks and still equal transformers' routing of the history."""
    path = make_tiny_model("qwen3_moe", tmp_path / "m", seed=15)
    eng = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=12, host_kv_cache_bytes=1 << 22))
    params = SamplingParams(max_tokens=8, ignore_eos=True, return_routed_experts=True)
    sessions = [eng.open_session() for _ in range(4)]
    for s, p in zip(sessions, [PROMPTS[2], PROMPTS[3][:30], list(range(200, 230)), list(range(300, 333))]):
        eng.run_turn(s, p, params)
    last = [eng.run_turn(s, [11, 12], params) for s in sessions]
    stats = eng.stats()
    assert stats["offloaded_sessions"] > 0 and stats["restored_sessions"] > 0, stats
    hf = hf_model(path)
    for c in last:
        tokens = c.prompt_token_ids + c.token_ids
        assert torch.equal(c.routed_experts.as_tensor(), hf_routing(hf, tokens)[:len(tokens) - 1])
    eng.check_integrity()

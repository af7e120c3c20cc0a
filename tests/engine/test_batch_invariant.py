"""EngineConfig(batch_invariant=True) and the trainer forward that reproduces it (engine.models.invariant_policy).

The oracle of invariance is the same engine run another way: a prompt decoded alone against the same prompt inside
random batches of other requests, under chunked prefill, after a prefix-cache hit, as an n > 1 sibling; tokens
and logprobs must be equal to the bit. The oracle of the trainer forward is the engine's own logprobs for the
tokens it produced (multi-turn sessions with observation tokens between turns); its gradient is checked against
transformers' autograd on the same weights (float32, to rounding).

CPU: float32 tiny models on the row-wise torch ops. GPU (``gpu`` marker): bf16 random weights of real shapes (a
few layers of each: a layer's invariance does not depend on how many follow it) on the Triton kernels. The kernels
themselves are checked against torch under TRITON_INTERPRET=1 on CPU (close, not bitwise: different orders).
"""
import gc
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is first imported (the kernel tests)

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from engine.tiny_models import make_tiny_model  # noqa: E402

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), batch_invariant=True, **kw))


def random_prompts(rng: random.Random, n: int, vocab: int, lo: int = 1, hi: int = 60) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def assert_same(a, b, what: str) -> None:
    assert a.token_ids == b.token_ids, f"{what}: tokens differ"
    assert a.logprobs == b.logprobs, f"{what}: logprobs differ (max {max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs))})"


def check_alone_vs_batches(path, rng: random.Random, *, probes: int, batch_sizes, max_tokens: int, **cfg) -> None:
    """Each probe prompt alone, then inside batches of random others (chunked prefill at a small token budget,
    a shared prefix cached by an earlier request, seeded sampling with n = 2): equal tokens and logprobs."""
    alone_engine = engine(path, **cfg)
    vocab = alone_engine.vocab_size
    probes_ = random_prompts(rng, probes, vocab, 3, 80)
    greedy = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    sampled = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0, seed=11, n=2)
    alone = [alone_engine.generate([p], greedy)[0] for p in probes_]
    alone_sampled = [alone_engine.generate([p], sampled) for p in probes_]
    del alone_engine
    for size in batch_sizes:
        busy = engine(path, max_num_batched_tokens=rng.choice([32, 64, 2048]), **cfg)
        # a request that leaves the probes' first half in the prefix cache
        busy.generate([p[:len(p) // 2 + 16] for p in probes_], SamplingParams(max_tokens=2, ignore_eos=True))
        # others of every length and output length, so the batch changes under the probes as they decode
        mixed = [(p, greedy) for p in probes_] + [
            (p, SamplingParams(max_tokens=rng.randint(1, 2 * max_tokens), ignore_eos=True))
            for p in random_prompts(rng, size, vocab)]
        rng.shuffle(mixed)
        outs = busy.generate([p for p, _ in mixed], [sp for _, sp in mixed])
        firsts = {}
        for o in outs:   # the first completion of each prompt (a random other may repeat a probe: harmless)
            firsts.setdefault(tuple(o.prompt_token_ids), o)
        for p, a in zip(probes_, alone):
            assert_same(firsts[tuple(p)], a, f"greedy, batch of {size}")
        outs = busy.generate([p for p, _ in mixed], [sampled if sp is greedy else sp for p, sp in mixed])
        for p, a in zip(probes_, alone_sampled):
            got = sorted((o for o in outs if o.prompt_token_ids == p and len(o.token_ids) == max_tokens
                          and o.logprobs), key=lambda o: o.sample_index)[:2]
            assert len(got) == 2, "both samples of the probe came back"
            for g, w in zip(got, a):
                assert_same(g, w, f"seeded n=2, batch of {size}")
        busy.check_integrity()
        del busy
        gc.collect()   # its device memory goes before the next engine sizes its KV cache


def multi_turn(engine_, rng: random.Random, sessions: int, turns: int, params: SamplingParams):
    """Sessions run together, an observation of random tokens between turns -> per session (all tokens,
    [(position, token, logprob)] of the model tokens)."""
    vocab = engine_.vocab_size
    ids = [engine_.open_session() for _ in range(sessions)]
    model_tokens: dict[str, list] = {s: [] for s in ids}
    for turn in range(turns):
        pending = {}
        for s in ids:
            new = [rng.randrange(vocab) for _ in range(rng.randint(2, 12) if turn else rng.randint(5, 40))]
            start = len(engine_.session_tokens(s)) + len(new)
            pending[engine_.submit_turn(s, new, params)] = (s, start)
        while pending:
            for c in engine_.step():
                s, start = pending.pop(c.request_id)
                model_tokens[s] += [(start + j, t, lp) for j, (t, lp) in enumerate(zip(c.token_ids, c.logprobs))]
    return [(engine_.session_tokens(s), model_tokens[s]) for s in ids]


def check_policy_parity(path, dtype: torch.dtype, device: str, rng: random.Random, **cfg) -> None:
    from transformers import AutoModelForCausalLM

    from engine.models.invariant_policy import InvariantPolicy

    eng = engine(path, device=device, dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype], **cfg)
    params = [SamplingParams(max_tokens=10, ignore_eos=True),
              SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.8, seed=5)]
    trajectories = multi_turn(eng, rng, 3, 3, params[0]) + multi_turn(eng, rng, 3, 2, params[1])
    temps = [1.0] * 3 + [0.8] * 3
    eng.check_integrity()
    del eng
    gc.collect()
    # fp32 master weights, as a trainer holds them; the policy computes in the engine's dtype
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    policy = InvariantPolicy(hf, compute_dtype=dtype, fp32_lm_head=cfg.get("fp32_lm_head", False))
    for temp in (1.0, 0.8):
        group = [t for t, tt in zip(trajectories, temps) if tt == temp]
        lps = policy.sequence_logprobs([tokens for tokens, _ in group], temp, device)
        for (tokens, model), lp in zip(group, lps):
            positions = torch.tensor([pos - 1 for pos, _, _ in model])
            want = torch.tensor([x for _, _, x in model], dtype=torch.float32)
            got = lp.detach().cpu()[positions]
            assert torch.equal(got, want), f"T={temp}: max |trainer - engine| {(got - want).abs().max().item()}"


# ---------------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_cpu_alone_equals_inside_batches(arch, tmp_path):
    path = make_tiny_model(arch, tmp_path / arch, seed=3)
    check_alone_vs_batches(path, random.Random(arch), probes=3, batch_sizes=[1, 9], max_tokens=8)


def test_the_default_mode_is_not_invariant_where_this_one_is(tmp_path):
    """The test above can fail: on the same workload the default CPU path's logprobs depend on the batch (its
    batched decode attention and whole-batch GEMMs round differently)."""
    path = make_tiny_model("qwen2", tmp_path / "m", seed=3)
    rng = random.Random(0)
    probe = random_prompts(rng, 1, 512, 30, 40)[0]
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    default = LLMEngine(EngineConfig(model=str(path)))
    alone = default.generate([probe], greedy)[0]
    outs = default.generate(random_prompts(rng, 12, 512) + [probe], greedy)
    assert outs[-1].logprobs != alone.logprobs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_cpu_trainer_forward_reproduces_the_engine_bitwise(arch, tmp_path):
    path = make_tiny_model(arch, tmp_path / arch, seed=4)
    check_policy_parity(path, torch.float32, "cpu", random.Random(arch))


@pytest.mark.parametrize("offset", [1, 2, 3, 8])
def test_cpu_linear_does_not_depend_on_where_the_weight_lies(offset):
    """A weight that is a view at any offset of a bigger buffer (as a trainer's loaded parameters can be) gives the
    same bits as an aligned one: the CPU BLAS changes its sum order with the address (an AMD EPYC moved results
    by 1e-6 at 4- and 8-byte offsets), so RowOps reads misaligned weights from an aligned copy."""
    from engine.models.invariant_ops import RowOps

    g = torch.Generator().manual_seed(offset)
    weight, x, bias = torch.randn(256, 576, generator=g), torch.randn(5, 576, generator=g), torch.randn(256, generator=g)
    buf = torch.empty(weight.numel() + 64)
    view = buf[offset:offset + weight.numel()].view_as(weight)
    view.copy_(weight)
    bbuf = torch.empty(256 + 16)
    bview = bbuf[offset:offset + 256]
    bview.copy_(bias)
    ops = RowOps()
    assert torch.equal(ops.linear(x, view, bview), ops.linear(x, weight.clone(), bias.clone()))


def test_trainer_forward_gradient_is_transformers_gradient(tmp_path):
    from transformers import AutoModelForCausalLM

    from engine.models.invariant_policy import InvariantPolicy

    path = make_tiny_model("qwen2", tmp_path / "m", seed=5)
    seqs = [list(range(3, 30)), [7, 8, 9, 10, 11]]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    policy = InvariantPolicy(hf)
    loss = sum((lp * torch.linspace(-1, 1, lp.numel())).sum() for lp in policy.sequence_logprobs(seqs, 0.9))
    loss.backward()
    ours = {n: p.grad.clone() for n, p in hf.named_parameters()}
    hf.zero_grad()
    loss = 0
    for s in seqs:
        logits = hf(input_ids=torch.tensor([s])).logits[0, :-1].float() / 0.9
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(s[1:])[:, None]).squeeze(1)
        loss = loss + (lp * torch.linspace(-1, 1, lp.numel())).sum()
    loss.backward()
    for n, p in hf.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=2e-4, atol=2e-5, msg=lambda m: f"{n}: {m}")
    assert [n for n, _ in policy.named_parameters()] == [n for n, _ in hf.named_parameters()]


def test_rl_token_logprobs_dispatches_to_the_policy(tmp_path):
    """rollout.rl.token_logprobs (what the PPO step calls) on a Batch of engine trajectories gives the engine's
    logprobs where the loss mask is set and 0 elsewhere."""
    from transformers import AutoModelForCausalLM

    from engine.models.invariant_policy import InvariantPolicy
    from rollout.rl import make_batch, token_logprobs
    from rollout.trajectory import Trajectory

    path = make_tiny_model("llama", tmp_path / "m", seed=6)
    eng = engine(path)
    trajs = []
    for tokens, model in multi_turn(eng, random.Random(1), 2, 2, SamplingParams(max_tokens=6, ignore_eos=True)):
        first = model[0][0]
        lp = {pos: x for pos, _, x in model}
        rest = range(first, len(tokens))
        trajs.append(Trajectory(prompt_ids=tokens[:first], token_ids=tokens[first:],
                                logprobs=[lp.get(i, 0.0) for i in rest], loss_mask=[int(i in lp) for i in rest],
                                versions=[0 if i in lp else -1 for i in rest]))
    batch = make_batch(trajs, [1.0, -1.0], pad_id=0)
    policy = InvariantPolicy(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    got = token_logprobs(policy, batch, 1.0).detach()
    assert torch.equal(got, batch.behaviour_logprobs)
    assert batch.loss_mask.sum() > 0 and (got[batch.loss_mask == 0] == 0).all()


def test_bad_input_is_refused_clearly(tmp_path):
    from engine.models.invariant_policy import InvariantPolicy

    with pytest.raises(ValueError, match="batch_invariant must be a bool"):
        EngineConfig(model="m", batch_invariant="yes")
    with pytest.raises(TypeError, match="transformers causal LM"):
        InvariantPolicy(torch.nn.Linear(2, 2))
    from transformers import AutoModelForCausalLM
    path = make_tiny_model("llama", tmp_path / "m", seed=6)
    policy = InvariantPolicy(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    with pytest.raises(ValueError, match="non-empty sequences"):
        policy.sequence_logprobs([[1, 2], []])


# ------------------------------------------------------------------------------ kernels under the interpreter
def test_kernels_agree_with_torch():
    from engine.attention import build_metadata
    from engine.attention.reference import TorchReferenceBackend
    from engine.models.decoder import apply_rotary
    from engine.models.invariant_ops import TritonInvariantOps

    device = "cuda" if CUDA else "cpu"
    ops = TritonInvariantOps()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 96, generator=g).to(device)
    w = torch.randn(150, 96, generator=g).to(device)
    b = torch.randn(150, generator=g).to(device)
    full = ops.linear(x, w, b)
    torch.testing.assert_close(full, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4)
    assert torch.equal(ops.linear(x[33:34], w, b), full[33:34]), "a row alone = the same row in a batch"
    # a narrow weight with a long K: its K range is split (engine.kernels.invariant.matmul_config)
    from engine.kernels.invariant import matmul_config
    xs, ws = torch.randn(70, 1024, generator=g).to(device), torch.randn(40, 1024, generator=g).to(device)
    assert matmul_config(40, 1024)[-1] > 1
    split = ops.linear(xs, ws, b[:40])
    torch.testing.assert_close(split, torch.nn.functional.linear(xs, ws, b[:40]), rtol=1e-5, atol=1e-3)
    assert torch.equal(ops.linear(xs[69:70], ws, b[:40]), split[69:70])
    # attention over a paged cache, two sequences: one decode, one prefill chunk over a cached prefix
    hq, hkv, d, bs = 4, 2, 16, 16
    meta = build_metadata([1, 5], [70, 21], [[3, 0, 5, 1, 7], [2, 6]], bs, device)
    caches = [torch.randn(8, bs, hkv, d, generator=g).to(device) for _ in range(2)]
    q = torch.randn(6, hq, d, generator=g).to(device)
    k = torch.randn(6, hkv, d, generator=g).to(device)
    v = torch.randn(6, hkv, d, generator=g).to(device)
    cos, sin = torch.randn(6, d // 2, generator=g).to(device), torch.randn(6, d // 2, generator=g).to(device)
    ref_caches = [c.clone() for c in caches]
    got = ops.attention(q.clone(), k, v, cos, sin, caches[0], caches[1], meta, 0.25)
    want = TorchReferenceBackend().forward(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, *ref_caches,
                                           meta, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    logits = torch.randn(5, 3000, generator=g).to(device)
    tokens = torch.tensor([0, 2999, 17, 5, 1000], device=device)
    temps = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.7], device=device)
    want = torch.log_softmax(logits / temps[:, None], -1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(ops.logprobs(logits, tokens, temps), want, rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- GPU
GPU_SHAPES = ["qwen2.5-0.5b", "llama-3.1-8b", "qwen3-1.7b"]


def real_shape(shape: str, root, layers: int, seed: int = 0):
    """Random bf16 weights of ``shape`` with ``layers`` layers, saved (the engine and transformers load them)."""
    from engine.tiny_models import REAL_SHAPES
    import transformers

    config_name, fields = REAL_SHAPES[shape]
    config = getattr(transformers, config_name)(**{**fields, "num_hidden_layers": layers})
    config.architectures = [config_name.replace("Config", "ForCausalLM")]
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = getattr(transformers, config.architectures[0])(config).to(torch.bfloat16)
    path = root / shape
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_alone_equals_inside_batches(shape, tmp_path):
    path = real_shape(shape, tmp_path, layers=4)
    check_alone_vs_batches(path, random.Random(shape), probes=4, batch_sizes=[1, 17, 256], max_tokens=16,
                           device="cuda", dtype="bfloat16", gpu_memory_utilization=0.5)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["qwen2.5-0.5b", "qwen3-1.7b"])
@pytest.mark.parametrize("fp32_lm_head", [False, True], ids=["bf16-head", "fp32-head"])
def test_gpu_trainer_forward_reproduces_the_engine_bitwise(shape, fp32_lm_head, tmp_path):
    path = real_shape(shape, tmp_path, layers=4)
    check_policy_parity(path, torch.bfloat16, "cuda", random.Random(shape), gpu_memory_utilization=0.4,
                        fp32_lm_head=fp32_lm_head)


ENGINE_IN_A_WORKER = """
import json, sys, torch
from engine import EngineConfig, LLMEngine, SamplingParams
eng = LLMEngine(EngineConfig(model=sys.argv[1], batch_invariant=True))
outs = eng.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=8, temperature=1.0, seed=1, ignore_eos=True))
print(json.dumps([[o.token_ids, o.logprobs] for o in outs]))
"""


@pytest.mark.skipif(CUDA, reason="the CPU row-wise ops")
def test_cpu_trainer_matches_an_engine_in_a_process_with_other_threads():
    """The engine in another process started with OMP_NUM_THREADS=1 (what a Ray worker of one CPU gets), the trainer
    here with 2 threads: still bitwise (RowOps runs each op on one thread)."""
    import json
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from engine.models.invariant_policy import InvariantPolicy

    from engine.llm_engine import resolve_model_path

    # NOTE: the real SmolLM2 (a tiny random model did not show the thread-count difference; this one did, 1.9e-6)
    path = resolve_model_path("smollm2")
    rng = random.Random(0)
    prompts = [[rng.randrange(49152) for _ in range(n)] for n in (37, 150)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", ENGINE_IN_A_WORKER, str(path), json.dumps(prompts)], env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    outs = json.loads(done.stdout.strip().splitlines()[-1])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        policy = InvariantPolicy(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
        with torch.no_grad():
            lps = policy.sequence_logprobs([p + t for p, (t, _) in zip(prompts, outs)], 1.0)
    finally:
        torch.set_num_threads(threads)
    for p, (_, engine_lp), lp in zip(prompts, outs, lps):
        assert torch.equal(lp[len(p) - 1:], torch.tensor(engine_lp, dtype=torch.float32))

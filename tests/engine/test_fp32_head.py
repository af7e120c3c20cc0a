"""EngineConfig.fp32_lm_head on a bf16 model: the final norm, the lm_head and the logprobs in float32.

The oracle is transformers' own bf16 forward up to the final norm's input (a hook), then the final norm, the
lm_head and log_softmax in float32 from the float32-upcast weights: what a trainer computing its logprobs with
an fp32 head gets. Its attention is computed as the engine's reference backend computes it (float32 inside, bf16
in and out) and it runs the sequence as the engine does (the prompt, then a token at a time), so the bf16 body
of both is the same to the bit (measured: not one element of 960 rows of final hidden states differs, 2
architectures x 5 seeds) and what is compared is the head alone.

Measured on these tiny models (llama: tied embeddings, qwen2: untied), max |engine - oracle| over every
generated token's logprob: 4.8e-7 with the option (float32 roundings only; FP32_TOL = 1e-5) and 1.6e-2
without it (the bf16 norm output and logits; BF16_MIN = 1e-3 says the mismatch is there to remove).

NOTE: that bitwise agreement of the bodies was measured on greedy trajectories. A sampled trajectory is whatever
the draws make it, and on some (a change of the sampler's noise stream was enough to land on one) transformers'
bf16 body rounds one position differently from the engine's, 1.5e-2 in a logprob with the head exact. So the
sampled tokens' logprobs are checked against the oracle's float32 head applied to the engine's OWN final hidden
states (recorded at the head's input): the same head check, with no dependence on which tokens were drawn.
Measured: 1.9e-6 with the option (float32 roundings), 1.4e-2 / 1.5e-2 without it (tied / untied),
2.3 for logprobs taken from the top_k-filtered distribution.
"""
import os
import shutil

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is first imported (the fused-path test)

from safetensors.torch import load_file  # noqa: E402

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from engine.tiny_models import make_tiny_model  # noqa: E402
from engine.weight_update import WeightUpdateError  # noqa: E402
from weight_sync import StateDictLoader  # noqa: E402

# the oracle's KV cache argument, under the name transformers 5.17 (the GPU machine's) knows too
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

FP32_TOL = 1e-5   # engine with the option vs the oracle (measured 4.8e-7)
BF16_MIN = 1e-3   # engine without it is at least this far off (measured 1.6e-2)
PROMPTS = [[3], [5, 6, 7, 8, 9, 10, 11], list(range(40, 60)), list(range(100, 140))]
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
SAMPLED = SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True, logprobs=2)  # the sampler path
# top_k binds (4 of 512 tokens survive): a logprob of the filtered, renormalised distribution would be far off
SAMPLED_TOP_K = SamplingParams(temperature=1.0, top_k=4, seed=7, max_tokens=24, ignore_eos=True, logprobs=2)


def _float32_attention(module, query, key, value, attention_mask, scaling, **kwargs):
    """transformers attention computed as the engine's reference backend computes it: bf16 in, float32
    scores / softmax / weighted sum over the visible keys, bf16 out. query [B, Hq, Tq, D], key/value
    [B, Hkv, Tk, D] -> [B, Tq, Hq, D]."""
    batch, num_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    q = query.float().reshape(batch, num_kv_heads, num_heads // num_kv_heads, q_len, head_dim)
    scores = torch.matmul(q, key.float()[:, :, None].transpose(-1, -2)) * scaling
    q_pos, k_pos = torch.arange(k_len - q_len, k_len), torch.arange(k_len)
    scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))   # causal
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float()[:, :, None])
    return out.reshape(batch, num_heads, q_len, head_dim).transpose(1, 2).to(query.dtype), None


def _hf(path, state=None):
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register("engine_float32", _float32_attention)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="engine_float32")
    if state is not None:   # replace some weights, as a partial update does
        _, unexpected = hf.load_state_dict(state, strict=False)
        assert not unexpected
    return hf.eval()


def oracle(hf, prompt: list[int], output: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logprob of each output token [n] float32, argmax at each output position [n]). The sequence runs as
    the engine runs it, the prompt then one token at a time over transformers' KV cache (a full-sequence pass
    sums its attention over other lengths and differs in the last bit of 4% of the rows)."""
    from transformers import DynamicCache

    rows = []
    hook = hf.model.norm.register_forward_pre_hook(lambda module, args: rows.append(args[0][0, -1]))
    cache = DynamicCache(config=hf.config)
    try:
        with torch.no_grad():
            for chunk in [prompt] + [[t] for t in output[:-1]]:
                hf(torch.tensor([chunk]), past_key_values=cache, use_cache=True)
    finally:
        hook.remove()
    # row i: the bf16 hidden state before the norm at the position that predicts output[i]
    logits = float32_head(torch.stack(rows), hf.model.norm.weight, hf.lm_head.weight, hf.config.rms_norm_eps)
    return token_logprobs(logits, output), logits.argmax(-1)


def float32_head(x: torch.Tensor, norm_weight: torch.Tensor, lm_head_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The oracle's head: hidden states [n, H] before the final norm -> logits [n, V], the norm and the lm_head
    in float32 from the upcast weights."""
    x = x.float()
    x = norm_weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    return x @ lm_head_weight.float().T


def token_logprobs(logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """log_softmax(logits [n, V]) at tokens[i] in row i -> [n] float32."""
    return torch.log_softmax(logits, -1)[torch.arange(len(tokens)), torch.tensor(tokens)]


def max_error(hf, completions) -> float:
    return max((torch.tensor(c.logprobs) - oracle(hf, c.prompt_token_ids, c.token_ids)[0]).abs().max().item()
               for c in completions)


def bf16_engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", **kw))


@pytest.fixture(scope="module", params=["llama", "qwen2"], ids=["tied", "untied"])
def tiny(request, tmp_path_factory):
    """(path of W1, path of W2): two random bf16 checkpoints of one architecture."""
    root = tmp_path_factory.mktemp(request.param)
    return tuple(make_tiny_model(request.param, root / f"w{s}", seed=s, dtype="bfloat16") for s in (1, 2))


def head_state(path, tied: bool) -> dict[str, torch.Tensor]:
    """New values for what the float32 head copies: ``path``'s lm_head (its embedding if tied) and a final norm
    drawn around 1 (a random checkpoint's norm is all ones, like every other's: a stale copy would go unseen)."""
    sd = load_file(str(path / "model.safetensors"))
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    norm = 1 + 0.3 * torch.randn(sd["model.norm.weight"].shape, generator=torch.Generator().manual_seed(5))
    return {head: sd[head], "model.norm.weight": norm.to(torch.bfloat16)}


def assert_copies_match(engine) -> None:
    """The float32 copies are the model's current (bf16) weights upcast, bitwise."""
    model = engine.model
    assert torch.equal(model.fp32_head.lm_head_weight, model.lm_head.weight.float())
    assert torch.equal(model.fp32_head.norm_weight, model.norm.weight.float())


def test_logprobs_match_the_float32_head_oracle_far_closer_than_the_bf16_head(tiny):
    w1, _ = tiny
    hf = _hf(w1)
    with_option = bf16_engine(w1, fp32_lm_head=True)
    assert with_option.model.fp32_head is not None and with_option.model.embed_tokens.weight.dtype == torch.bfloat16
    greedy = with_option.generate(PROMPTS, GREEDY)
    err_on = max_error(hf, greedy)
    err_off = max_error(hf, bf16_engine(w1).generate(PROMPTS, GREEDY))
    assert err_on < FP32_TOL < BF16_MIN < err_off, (err_on, err_off)
    for c in greedy:     # greedy ids are the oracle's argmax at every position
        assert c.token_ids == oracle(hf, c.prompt_token_ids, c.token_ids)[1].tolist()
    # sampled (temperature 1, with and without a binding top_k): each token's logprob is the full-softmax logprob
    # of the float32 head, and the top logprobs are that distribution's largest; the oracle's head reads the
    # engine's own hidden states (module docstring: why not transformers' on a sampled trajectory)
    recorded = bf16_engine(w1, fp32_lm_head=True, async_scheduling=False)
    for params in (SAMPLED, SAMPLED_TOP_K):
        err, top_err = own_hidden_state_errors(recorded, params, recorded.model.fp32_head, "norm")
        assert err < FP32_TOL and top_err < FP32_TOL, (params, err, top_err)
    # ... which the bf16 head is not: the same check on the engine without the option (its bf16 final norm)
    off = bf16_engine(w1, async_scheduling=False)
    err, _ = own_hidden_state_errors(off, SAMPLED, off.model.norm, "forward")
    assert err > BF16_MIN, err
    recorded.check_integrity()
    with_option.check_integrity()


def own_hidden_state_errors(engine, params, owner, attr: str) -> tuple[float, float]:
    """Generate each prompt alone with ``params``, recording the input of the final norm (the method ``attr`` of
    ``owner``) at every forward -> (max |logprob - oracle|, max |top logprob - oracle|) over the sampled tokens;
    the oracle is ``float32_head`` (the float32 norm, lm_head and log_softmax from the upcast bf16 parameters)
    on the recorded hidden states. One forward a sampled token: the prompt's, then one a decode step (the
    engine runs with ``async_scheduling=False``)."""
    model, rows = engine.model, []
    original = getattr(owner, attr)

    def recording(hidden):
        rows.append(hidden.clone())
        return original(hidden)

    setattr(owner, attr, recording)   # an instance attribute over the class's method, deleted below
    norm_w, lm_head_w = model.norm.weight, model.lm_head.weight   # the bf16 parameters
    err = top_err = 0.0
    try:
        for prompt in PROMPTS:
            rows.clear()
            (c,) = engine.generate([prompt], params)
            x = torch.cat([rows[0][-1:], *rows[1:]])   # the prefill's last row, then one a decode step
            assert x.shape[0] == len(c.token_ids)
            logits = float32_head(x, norm_w, lm_head_w, model.config.rms_norm_eps)
            err = max(err, (torch.tensor(c.logprobs) - token_logprobs(logits, c.token_ids)).abs().max().item())
            if params.logprobs:   # the largest values, and each at its own token (near-ties may swap the ids)
                log_probs = torch.log_softmax(logits, -1)
                ids = torch.tensor([[t for t, _ in top] for top in c.top_logprobs])
                got = torch.tensor([[lp for _, lp in top] for top in c.top_logprobs])
                want = log_probs.topk(params.logprobs, dim=-1).values
                top_err = max(top_err, (got - want).abs().max().item(),
                              (got - log_probs.gather(1, ids)).abs().max().item())
    finally:
        delattr(owner, attr)
    return err, top_err


@pytest.mark.parametrize("how", ["complete", "partial head", "bucketed head"])
def test_an_update_refreshes_the_float32_copies(tiny, how, tmp_path):
    """W1 -> (W2, or W1 with W2's head) through the update API: greedy tokens and logprobs bitwise those of a
    fresh engine loaded from a checkpoint of the new weights (the load path builds its float32 copies from the
    checkpoint; the update path must refresh them to the same bytes).

    NOTE: the oracle is a fresh engine, not transformers: the float32 head's agreement with an independent
    oracle is the test above. An HF oracle here needed transformers' bf16 body to equal the engine's bitwise
    on the new weights, and with transformers 5.24 one position of one prompt of W2 (qwen2) differs by a
    rounding in the body (1.5e-2 in its logprob) with the head exact, so it tested transformers' numerics."""
    from safetensors.torch import save_file

    from tests.weight_sync.test_bucketed_update import PackedBuckets

    w1, w2 = tiny
    e = bf16_engine(w1, fp32_lm_head=True)
    tied = e.model_config.tie_word_embeddings
    head_before = e.model.fp32_head.lm_head_weight.data_ptr(), e.model.fp32_head.norm_weight.data_ptr()
    e.generate(PROMPTS[:2], GREEDY)
    if how == "complete":
        e.update_weights(StateDictLoader(load_file(str(w2 / "model.safetensors"))))
        new_weights = w2
    else:
        head = head_state(w2, tied)
        e.update_weights((StateDictLoader if how == "partial head" else PackedBuckets)(head), partial=True)
        new_weights = tmp_path / "w1-with-w2-head"     # W1's checkpoint with the new head written in
        shutil.copytree(w1, new_weights)
        save_file({**load_file(str(w1 / "model.safetensors")), **head}, str(new_weights / "model.safetensors"))
    fresh = bf16_engine(new_weights, fp32_lm_head=True)
    got, want = e.generate(PROMPTS, GREEDY), fresh.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.logprobs for c in got] == [c.logprobs for c in want]
    assert_copies_match(e)
    # in place: the decode CUDA graphs read the copies at the addresses they were captured with
    assert (e.model.fp32_head.lm_head_weight.data_ptr(), e.model.fp32_head.norm_weight.data_ptr()) == head_before
    e.check_integrity()


def test_a_rolled_back_update_leaves_the_copies_matching_the_restored_weights(tiny):
    w1, w2 = tiny
    e = bf16_engine(w1, fp32_lm_head=True)
    before = e.generate(PROMPTS, GREEDY)
    copies = e.model.fp32_head.lm_head_weight.clone(), e.model.fp32_head.norm_weight.clone()
    head = head_state(w2, e.model_config.tie_word_embeddings)

    def head_then_failure():
        yield from head.items()      # the head is written (and backed up) first ...
        raise RuntimeError("trainer died")   # ... then the update fails and is rolled back

    with pytest.raises(WeightUpdateError, match="trainer died"):
        e.update_weights(StateDictLoader(head_then_failure()), partial=True)
    assert_copies_match(e)
    assert torch.equal(e.model.fp32_head.lm_head_weight, copies[0])
    assert torch.equal(e.model.fp32_head.norm_weight, copies[1])
    after = e.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in after] == [c.token_ids for c in before]
    assert [c.logprobs for c in after] == [c.logprobs for c in before]


def test_an_update_of_the_layers_only_leaves_the_copies_alone(tiny):
    w1, w2 = tiny
    e = bf16_engine(w1, fp32_lm_head=True)
    sd = load_file(str(w2 / "model.safetensors"))
    layers = {n: t for n, t in sd.items() if n.startswith("model.layers.")}
    with torch.no_grad():
        e.model.fp32_head.norm_weight.fill_(7.0)   # a marker a refresh would overwrite
    e.update_weights(StateDictLoader(layers), partial=True)
    assert bool((e.model.fp32_head.norm_weight == 7.0).all())


def test_sleep_level_2_releases_the_copies_and_the_next_update_refills_them(tiny):
    w1, w2 = tiny
    e = bf16_engine(w1, fp32_lm_head=True, block_size=4, num_kv_blocks=64)
    params = sum(p.numel() * p.element_size() for p in e.updater.params.values())
    mc = e.model_config
    report = e.sleep(2)
    assert report.weight_bytes == params + (mc.vocab_size + 1) * mc.hidden_size * 4
    assert e.model.fp32_head.lm_head_weight.numel() == 0
    e.wake_up()
    e.update_weights(StateDictLoader(load_file(str(w2 / "model.safetensors"))))
    assert_copies_match(e)
    assert max_error(_hf(w2), e.generate(PROMPTS[:2], GREEDY)) < FP32_TOL


def test_float32_model_is_a_no_op_and_the_field_is_validated(tiny, caplog):
    w1, _ = tiny
    with caplog.at_level("DEBUG", logger="engine.llm_engine"):
        e = LLMEngine(EngineConfig(model=str(w1), dtype="float32", fp32_lm_head=True))
    assert e.model.fp32_head is None
    assert sum("fp32_lm_head: no-op" in r.getMessage() for r in caplog.records) == 1
    assert not EngineConfig(model="m", dtype="float32", fp32_lm_head=True).fp32_head_in_effect
    assert EngineConfig(model="m", dtype="float16", fp32_lm_head=True).fp32_head_in_effect
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="EngineConfig.fp32_lm_head must be a bool"):
            EngineConfig(model="m", fp32_lm_head=bad)


# --------------------------------------------------------------------------------------- Triton (interpreted)
def test_rms_norm_kernel_upcast_equals_the_float32_norm():
    """The fused final norm: the residual sum rounded to bf16, then normalized and scaled in float32."""
    pytest.importorskip("triton")
    from engine.kernels import rms_norm
    from engine.models.fp32_head import Fp32Head

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    T, H, eps = 5, 96, 1e-6
    head = Fp32Head(16, H, eps, torch.device(device))
    head.refresh(torch.randn(H, generator=gen).to(torch.bfloat16), torch.zeros(16, H))
    x, residual = (torch.randn(T, H, generator=gen).to(torch.bfloat16).to(device) for _ in range(2))
    out, summed = rms_norm(x, head.norm_weight, eps, residual, upcast=True)
    assert out.dtype == torch.float32 and summed.dtype == torch.bfloat16
    torch.testing.assert_close(out, head.norm(summed), atol=1e-6, rtol=1e-6)
    # without upcast the normalized row is rounded to bf16 before the weight multiply: visibly different
    rounded, _ = rms_norm(x, head.norm_weight, eps, residual)
    assert (rounded.float() - out).abs().max().item() > 1e-3


def test_fused_path_ends_in_the_float32_head(tmp_path):
    """The fused decoder path (Triton; interpreted on the CPU) ends in the float32 head's norm and lm_head.
    The copies are made to differ from the bf16 weights (norm x3, another lm_head), so a path that read the
    bf16 ones would be off by far more than the bf16 body roundings (the interpreter truncates instead of
    rounding: up to ~3% of the largest logit)."""
    pytest.importorskip("triton")
    from engine.attention import build_metadata, build_positions, get_backend
    from engine.kv_cache import allocate_kv_cache
    from engine.weights import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, config = load_model(make_tiny_model("qwen2", tmp_path / "m", seed=3, dtype="bfloat16"),
                               torch.bfloat16, device)
    model.enable_fp32_head()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.fp32_head.norm_weight.mul_(3.0)
        model.fp32_head.lm_head_weight.copy_(0.2 * torch.randn(config.vocab_size, config.hidden_size, generator=gen))
    q = [6, 3]
    meta = build_metadata(q, q, [[0, 1], [2]], 4, device)
    ids = torch.randint(0, config.vocab_size, (sum(q),), generator=gen).to(device)
    pos = torch.from_numpy(build_positions(q, q)).to(device)
    outs = []
    for fused in (False, True):
        model.use_fused_ops = fused
        caches = allocate_kv_cache(config, 4, 4, torch.bfloat16, device)
        hidden = model(ids, pos, caches, meta, get_backend("reference"))
        assert hidden.dtype == torch.float32
        outs.append(model.compute_logits(hidden, upcast=False))   # what the greedy kernel reads: float32 too
    model.use_fused_ops = None
    torch_path, fused_path = outs
    assert fused_path.dtype == torch.float32
    assert (fused_path - torch_path).abs().max() < 0.05 * torch_path.abs().max()


# ----------------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cuda_engine(path, **kw) -> LLMEngine:
    # decode_gemv fixed: "auto" picks by timing, so two engines could round differently
    return LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", device="cuda", max_model_len=256,
                                  decode_gemv="off", **kw))


def merged_checkpoint(src, dst, state: dict[str, torch.Tensor]):
    """A copy of the checkpoint at ``src`` with ``state``'s tensors replaced (what a fresh engine loads)."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    save_file({**sd, **state}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.gpu
@gpu
def test_on_cuda_logprobs_are_the_float32_head_of_the_engines_own_hidden_states(tiny):
    """On CUDA the CPU oracle's bf16 body is not the engine's (cuBLAS, Triton attention: measured 1e-2 apart
    in logprob with or without the option), so the oracle's head (float32 norm, lm_head and log_softmax from
    the upcast bf16 parameters) is applied to the engine's own final hidden states, recorded on the eager
    path: greedy rows sampled by the Triton greedy kernel, other rows by the sampler, both from float32
    logits. Graph replays, whose final norm reads the copy, give float32 hidden states and the same tokens."""
    w1, _ = tiny
    e = cuda_engine(w1, fp32_lm_head=True, async_scheduling=False)   # one recorded row per step
    assert e.runner.graphs is not None and e.runner._greedy_kernel is not None
    assert all(out.dtype == torch.float32 for out in e.runner.graphs.outputs.values())
    graphed = e.generate(PROMPTS, GREEDY)
    assert e.runner.step_counts["graph"] > 0
    e.runner.use_cuda_graphs = False
    assert [c.token_ids for c in e.generate(PROMPTS, GREEDY)] == [c.token_ids for c in graphed]
    head, rows = e.model.fp32_head, []
    norm_fused = head.norm_fused

    def recording(hidden, residual, kernels):
        rows.append(hidden + residual)   # the bf16 sum the kernel normalizes, rounded alike
        return norm_fused(hidden, residual, kernels)

    head.norm_fused = recording
    norm_w, lm_head_w = e.model.norm.weight.cpu(), e.model.lm_head.weight.cpu()   # the bf16 parameters
    for params in (GREEDY, SAMPLED):
        for prompt in PROMPTS:
            rows.clear()
            (c,) = e.generate([prompt], params)
            x = torch.cat([rows[0][-1:], *rows[1:]]).cpu()   # the prefill's last row, then one a decode step
            assert x.shape[0] == len(c.token_ids)
            lp = token_logprobs(float32_head(x, norm_w, lm_head_w, head.eps), c.token_ids)
            assert (torch.tensor(c.logprobs) - lp).abs().max().item() < FP32_TOL


@pytest.mark.gpu
@gpu
def test_cuda_graphs_read_the_refreshed_copies(tiny, tmp_path):
    """W1 + a partial update of the head (a new norm too) under captured graphs == a fresh engine on the merged
    checkpoint, to the bit: the graphs read the copies where they were captured, refreshed in place."""
    w1, w2 = tiny
    e = cuda_engine(w1, fp32_lm_head=True)
    e.generate(PROMPTS, GREEDY)
    head = head_state(w2, e.model_config.tie_word_embeddings)
    e.update_weights(StateDictLoader(head), partial=True)
    got = e.generate(PROMPTS, GREEDY)
    assert e.runner.step_counts["graph"] > 0
    fresh = cuda_engine(merged_checkpoint(w1, tmp_path / "merged", head), fp32_lm_head=True).generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in got] == [c.token_ids for c in fresh]
    assert [c.logprobs for c in got] == [c.logprobs for c in fresh]

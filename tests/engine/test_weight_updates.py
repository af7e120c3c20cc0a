"""LLMEngine.update_weights: every CPU loader switches W1 -> W2 so outputs equal a fresh W2 engine;
per-token versions across an update in flight; keep/drain/abort; kv recompute; corrupt updates
leave the engine bitwise unchanged and serving; a custom loader registered by name."""
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.tiny_models import make_tiny_model
from engine.weight_update import WeightUpdateError
from weight_sync import StateDictLoader, get_loader, register_loader

PROMPTS = [list(range(3, 30)), [5, 6, 7], list(range(100, 160))]
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("upd")
    return {"w1": make_tiny_model("llama", root / "w1", seed=1), "w2": make_tiny_model("llama", root / "w2", seed=2)}


@pytest.fixture(scope="module")
def w2_outputs(ckpts):
    fresh = LLMEngine(EngineConfig(model=str(ckpts["w2"])))
    return [c.token_ids for c in fresh.generate(PROMPTS, GREEDY)]


def engine_w1(ckpts, **kw):
    e = LLMEngine(EngineConfig(model=str(ckpts["w1"]), **kw))
    e.generate(PROMPTS, GREEDY)          # warm the prefix cache with W1 blocks
    return e


def params_of(engine):
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


def assert_same(engine, before):
    for n, p in engine.model.named_parameters():
        assert torch.equal(p, before[n]), n


def check_w2(engine, w2_outputs, version):
    outs = engine.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in outs] == w2_outputs
    assert all(set(c.versions) == {version} for c in outs)
    assert engine.weight_version == version
    engine.check_integrity()


def test_safetensors_and_state_dict_loaders(ckpts, w2_outputs):
    e = engine_w1(ckpts)
    e.update_weights(get_loader("safetensors", path=str(ckpts["w2"])))
    check_w2(e, w2_outputs, 1)
    e = engine_w1(ckpts)
    e.update_weights(StateDictLoader(load_file(str(ckpts["w2"] / "model.safetensors"))), version=5)
    check_w2(e, w2_outputs, 5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_gloo_loader(ckpts, w2_outputs):
    from tests.weight_sync import _sender
    from weight_sync import init_weight_sync_group

    e = engine_w1(ckpts)
    port = _free_port()
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    child = ctx.Process(target=_sender.send_updates,
                        args=(port, [(str(ckpts["w2"] / "model.safetensors"), 3, False)], 1 << 16, result))
    child.start()
    try:
        group = init_weight_sync_group("127.0.0.1", port, rank=1, world_size=2, timeout_s=60)
        e.update_weights(get_loader("distributed", group=group, src=0))
        assert result.get(timeout=60)[0] == "ok"
    finally:
        child.join(timeout=60)
    check_w2(e, w2_outputs, 3)


def test_ray_object_loader(ckpts, w2_outputs):
    pytest.importorskip("ray")
    from tests.rollout.pool_helpers import local_ray
    from weight_sync import RayObjectLoader, put_state_dict

    local_ray()
    refs = put_state_dict(load_file(str(ckpts["w2"] / "model.safetensors")), bucket_bytes=1 << 16, version=9)
    e = engine_w1(ckpts)
    e.update_weights(RayObjectLoader(refs))
    check_w2(e, w2_outputs, 9)


def _w2_loader(ckpts):
    return StateDictLoader(load_file(str(ckpts["w2"] / "model.safetensors")))


def _run_some_steps(engine, n):
    done = []
    for _ in range(n):
        done += engine.step()
    return done


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_keep_mode_versions_switch_mid_generation(ckpts, async_scheduling):
    e = LLMEngine(EngineConfig(model=str(ckpts["w1"]), async_scheduling=async_scheduling))
    rid = e.add_request(PROMPTS[0], SamplingParams(max_tokens=20, ignore_eos=True))
    delivered = _run_some_steps(e, 6)                        # prefill + 5 decodes: 6 tokens read under v0
    assert not delivered
    e.update_weights(_w2_loader(ckpts), mode="keep")
    done = []
    while e.has_unfinished():
        done += e.step()
    (c,) = [c for c in done if c.request_id == rid]
    # With async scheduling the 7th decode was already queued (under v0) when the update came: it is
    # read first and stamped with the weights it ran under.
    n0 = 7 if async_scheduling else 6
    assert c.versions == [0] * n0 + [1] * (20 - n0)


def test_kv_recompute_continuation_equals_fresh_w2(ckpts):
    e = LLMEngine(EngineConfig(model=str(ckpts["w1"])))
    rid = e.add_request(PROMPTS[2], SamplingParams(max_tokens=20, ignore_eos=True))
    _run_some_steps(e, 5)
    e.update_weights(_w2_loader(ckpts), kv="recompute")
    done = []
    while e.has_unfinished():
        done += e.step()
    (c,) = [c for c in done if c.request_id == rid]
    n0 = c.versions.count(0)  # 5, or 6 when a decode was queued ahead under W1 (async scheduling)
    assert n0 in (5, 6) and c.versions == [0] * n0 + [1] * (20 - n0)
    # a fresh W2 engine continuing the same tokens (the prompt + the tokens sampled under W1)
    fresh = LLMEngine(EngineConfig(model=str(ckpts["w2"])))
    cont = fresh.generate([PROMPTS[2] + c.token_ids[:n0]], SamplingParams(max_tokens=20 - n0, ignore_eos=True))[0]
    assert c.token_ids[n0:] == cont.token_ids
    assert e.stats()["preemptions"] == 0
    e.check_integrity()


def test_drain_and_abort_modes(ckpts):
    e = LLMEngine(EngineConfig(model=str(ckpts["w1"]), max_num_seqs=1))
    running = e.add_request(PROMPTS[1], SamplingParams(max_tokens=10, ignore_eos=True))
    queued = e.add_request(PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True))
    _run_some_steps(e, 3)
    e.update_weights(_w2_loader(ckpts), mode="drain")          # finishes `running` first, under v0
    done = []
    while e.has_unfinished():
        done += e.step()
    by_id = {c.request_id: c for c in done}
    assert by_id[running].versions == [0] * 10 and len(by_id[running].token_ids) == 10
    assert by_id[queued].versions == [1] * 4

    a = e.add_request(PROMPTS[2], SamplingParams(max_tokens=30, ignore_eos=True))
    b = e.add_request(PROMPTS[1], SamplingParams(max_tokens=30, ignore_eos=True))
    _run_some_steps(e, 4)
    e.update_weights(get_loader("safetensors", path=str(ckpts["w1"])), mode="abort")
    out = {c.request_id: c for c in e.step()}
    assert out[a].finish_reason == "aborted" and 0 < len(out[a].token_ids) < 30
    assert out[b].finish_reason == "aborted" and out[b].token_ids == []   # queued, never ran
    assert not e.has_unfinished() and e.weight_version == 2
    e.check_integrity()


@pytest.mark.parametrize("corrupt, match", [
    ("missing", "lacks"), ("unexpected", "unexpected|unknown"), ("shape", "shape"),
    ("dtype", "dtype|floating"), ("nan", "finite|NaN|nan"), ("raises", "boom"),
])
def test_corrupt_updates_leave_engine_unchanged_and_serving(ckpts, corrupt, match):
    e = LLMEngine(EngineConfig(model=str(ckpts["w1"])))
    before = params_of(e)
    expected = [c.token_ids for c in e.generate(PROMPTS, GREEDY)]
    sd = load_file(str(ckpts["w2"] / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    if corrupt == "missing":
        del sd[name]
    elif corrupt == "unexpected":
        sd["model.layers.9.foo.weight"] = torch.zeros(2)
    elif corrupt == "shape":
        sd[name] = torch.zeros(3, 3)
    elif corrupt == "dtype":
        sd[name] = sd[name].to(torch.int32)
    elif corrupt == "nan":
        sd[name] = sd[name].clone()
        sd[name][0, 0] = float("nan")

    if corrupt == "raises":
        class Failing(StateDictLoader):
            def iter_tensors(self):
                for i, item in enumerate(super().iter_tensors()):
                    if i == 5:
                        raise RuntimeError("boom: trainer died")
                    yield item
        loader = Failing(iter(list(sd.items())))          # no manifest: writes start before the failure
    else:
        loader = StateDictLoader(sd)
    rid = e.add_request(PROMPTS[0], SamplingParams(max_tokens=8, ignore_eos=True))
    _run_some_steps(e, 2)
    with pytest.raises(WeightUpdateError, match=match):
        e.update_weights(loader, check_finite=True)
    assert_same(e, before)
    assert e.weight_version == 0 and not e.stats()["weights_inconsistent"]
    done = []
    while e.has_unfinished():
        done += e.step()
    assert [c.request_id for c in done] == [rid] and set(done[0].versions) == {0}
    assert [c.token_ids for c in e.generate(PROMPTS, GREEDY)] == expected


def test_unrecoverable_failure_refuses_work_until_complete_update(ckpts, w2_outputs):
    e = LLMEngine(EngineConfig(model=str(ckpts["w1"])))
    sd = load_file(str(ckpts["w2"] / "model.safetensors"))

    def failing():
        for i, item in enumerate(sd.items()):
            if i == 5:
                raise RuntimeError("boom")
            yield item
    e.add_request(PROMPTS[0], SamplingParams(max_tokens=8))
    e.step()
    with pytest.raises(WeightUpdateError):
        e.update_weights(StateDictLoader(failing()), backup_budget_bytes=0)
    assert e.stats()["weights_inconsistent"]
    assert [c.finish_reason for c in e.step()] == ["aborted"]     # in-flight work was not served a mix
    with pytest.raises(RuntimeError, match="inconsistent"):
        e.add_request(PROMPTS[0], GREEDY)
    e.update_weights(_w2_loader(ckpts))
    assert not e.stats()["weights_inconsistent"]
    check_w2(e, w2_outputs, e.weight_version)


def test_custom_loader_registered_by_name(ckpts, w2_outputs):
    calls = []

    class DoubleThenHalve:
        """A user's loader: reads a safetensors file and streams each tensor (no manifest)."""
        def __init__(self, path):
            self.path, self.version = path, 42

        def names_and_shapes(self):
            return None

        def iter_tensors(self):
            calls.append("iter")
            yield from load_file(self.path).items()

        def close(self):
            calls.append("close")

    register_loader("my_loader", DoubleThenHalve, replace=True)
    e = engine_w1(ckpts)
    e.update_weights(get_loader("my_loader", path=str(ckpts["w2"] / "model.safetensors")))
    assert calls == ["iter", "close"]
    check_w2(e, w2_outputs, 42)


def test_bad_update_arguments(ckpts):
    e = LLMEngine(EngineConfig(model=str(ckpts["w1"])))
    with pytest.raises(ValueError, match="mode"):
        e.update_weights(_w2_loader(ckpts), mode="later")
    with pytest.raises(ValueError, match="kv"):
        e.update_weights(_w2_loader(ckpts), kv="maybe")
    with pytest.raises(ValueError, match="version"):
        e.update_weights(_w2_loader(ckpts), version=0)

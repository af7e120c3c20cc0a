"""CPU smoke of benchmarks/weight_sync.py --gpu: its helpers, and the two-process path over gloo (the NCCL case's
code with a tiny model). The CUDA IPC case itself needs a GPU and is not run here."""
from __future__ import annotations

import sys

import pytest
import torch

from benchmarks import weight_sync_gpu as wsg
from weight_sync.buckets import named_tensor_list, plan_buckets

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    return wsg.write_config(wsg.TINY, tmp_path_factory.mktemp("wsg") / "tiny")


def test_random_state_dict_has_the_engine_names_and_shapes(tiny_config):
    sd = wsg.random_state_dict(tiny_config, torch.device("cpu"))
    assert {n: tuple(t.shape) for n, t in sd.items()} == wsg.hf_shapes(tiny_config)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert "model.layers.0.self_attn.q_proj.bias" in sd and "lm_head.weight" not in sd  # qwen2, tied
    # bucket sizes from shapes alone equal the sender's plan over the real tensors
    assert wsg.bucket_sizes(tiny_config, 4096) == list(plan_buckets(named_tensor_list(sd), 4096).bucket_sizes)


def test_checksums_see_one_changed_element_and_a_swap():
    t = torch.randn(1000, dtype=torch.bfloat16)
    base = wsg.checksums({"t": t}, chunk=128)["t"]
    assert wsg.checksums({"t": t.clone()}, chunk=128)["t"] == base
    assert wsg.checksums({"t": t.clone()}, chunk=1 << 20)["t"] == base  # chunking does not change the sums
    bumped = t.clone()
    bumped.view(torch.int16)[517] += 1  # one bit of one element
    assert wsg.checksums({"t": bumped}, chunk=128)["t"] != base
    swapped = t.clone()
    swapped[[3, 900]] = t[[900, 3]]
    if not torch.equal(t[3], t[900]):
        assert wsg.checksums({"t": swapped}, chunk=128)["t"] != base


def test_copy_bandwidth_counts_read_and_write():
    bw = wsg.copy_bandwidth(torch.device("cpu"), 1 << 20, repeats=2)
    assert bw["bytes"] == 1 << 20 and bw["gbps_read_write"] == pytest.approx(2 * bw["bytes"] / bw["seconds"] / 1e9)


@no_cuda
@pytest.mark.slow
def test_cpu_fallback_runs_the_two_process_path(tmp_path):
    written = []
    results = wsg.run([wsg.TINY], [1], 1, True, None, written.append, tmp_path, case_timeout_s=240)
    assert not results.get("errors"), results.get("errors")
    (r,) = results["nccl"]
    assert r["verify"]["bitwise_equal"] and r["verify"]["tensors_checked"] == len(wsg.hf_shapes(tmp_path / wsg.TINY))
    versions = r["keep_demo"]["versions"]
    n0 = versions.count(0)  # 6 steps read under v0, plus the decode queued ahead of the update (async scheduling)
    assert n0 == 7 and versions == [0] * n0 + [1] * (24 - n0)  # one switch, between steps
    assert r["rows"][0]["raw"]["median_s"] > 0 and r["rows"][0]["update_no_backup"]["median_s"] > 0
    md = wsg.markdown(results, "abc1234", "2026-01-01 00:00 UTC")
    assert "Not run: IPC case: needs CUDA" in md and "cpu-fallback" in md and "| tiny-qwen2 |" in md
    assert written and written[-1] is results


@no_cuda
def test_gpu_mode_without_cuda_asks_for_tiny(monkeypatch):
    from benchmarks import weight_sync

    monkeypatch.setattr(sys, "argv", ["weight_sync", "--gpu"])
    with pytest.raises(SystemExit, match="--gpu --tiny"):
        weight_sync.main()

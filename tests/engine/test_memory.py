"""KV sizing (engine.memory): on CUDA the budget leaves room for an eager step, the sampler, the CUDA graph pool
and the rollback copy an update keeps; a configuration that cannot hold one sequence fails at start, naming
each term. (mem_get_info is given, so this runs without a GPU.)"""
import pytest
import torch

from engine import EngineConfig
from engine.memory import device_kv_blocks, host_kv_bytes
from engine.model_config import ModelConfig
from engine.tiny_models import make_tiny_model

GB = 1 << 30


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    return ModelConfig.from_pretrained(make_tiny_model("qwen2", tmp_path_factory.mktemp("mem"), seed=1))


def sized(cfg, mc, free, total, param_bytes, block_bytes=1 << 20, max_model_len=1024):
    return device_kv_blocks(cfg, mc, block_bytes, max_model_len, torch.device("cuda"), param_bytes,
                            mem_get_info=lambda device: (free, total))


def test_the_budget_leaves_room_for_the_update_backup_graphs_and_sampler(mc):
    cfg = EngineConfig(model="unused", max_num_seqs=64, max_num_batched_tokens=2048, cuda_graph_max_batch=32)
    free, total, params = 70 * GB, 80 * GB, 4 * GB
    per_token = (mc.hidden_size * 4 + mc.q_size + 2 * mc.kv_size + 2 * mc.intermediate_size) * 4
    # the mixed-step graph pool: one step of the largest bucket, min(cuda_graph_max_tokens, the step budget)
    # the extend kernel's split partials: none by default (extend_kv_splits = 1)
    partials = 0
    expected_budget = int(total * 0.9) - (total - free) - 2048 * per_token - 64 * mc.vocab_size * 12 \
        - 32 * per_token - 2048 * per_token - params - partials
    kw = dict(block_bytes=64 << 10, max_model_len=1 << 20)     # a ceiling far above the budget
    assert sized(cfg, mc, free, total, params, **kw) == expected_budget // (64 << 10)
    no_backup = EngineConfig(model="unused", max_num_seqs=64, max_num_batched_tokens=2048, cuda_graph_max_batch=32,
                             update_backup_bytes=0)
    assert sized(no_backup, mc, free, total, params, **kw) - sized(cfg, mc, free, total, params, **kw) \
        == params // (64 << 10)


def test_the_mixed_step_graph_pool_is_reserved_up_to_the_step_budget(mc):
    base = dict(model="unused", max_num_seqs=64, max_num_batched_tokens=1024, cuda_graph_max_batch=32)
    per_token = (mc.hidden_size * 4 + mc.q_size + 2 * mc.kv_size + 2 * mc.intermediate_size) * 4
    free, total, params = 70 * GB, 80 * GB, 4 * GB
    kw = dict(block_bytes=1, max_model_len=1 << 36)     # 1-byte blocks: the count is the budget in bytes
    off = sized(EngineConfig(**base, cuda_graph_max_tokens=0), mc, free, total, params, **kw)
    # capped by max_num_batched_tokens (1024), whatever cuda_graph_max_tokens asks
    assert off - sized(EngineConfig(**base), mc, free, total, params, **kw) == 1024 * per_token
    # with the extend kernel's split-KV on, its partials (float32 o + lse per token, head and split) at the
    # largest step that splits (1,024 tokens), for an eager step and inside the graph pool
    split_partials = 1024 * mc.num_heads * 4 * (mc.head_dim + 1) * 4
    assert off - sized(EngineConfig(**base, extend_kv_splits=4), mc, free, total, params, **kw) \
        == 1024 * per_token + 2 * split_partials
    assert off - sized(EngineConfig(**base, cuda_graph_max_tokens=256), mc, free, total, params, **kw) \
        == 256 * per_token
    assert EngineConfig(**base, enable_cuda_graphs=False).mixed_graph_tokens == 0
    for bad in (-1, 1.5, True, "64"):
        with pytest.raises(ValueError, match="cuda_graph_max_tokens"):
            EngineConfig(**base, cuda_graph_max_tokens=bad)


def test_a_budget_that_cannot_hold_one_sequence_fails_at_start_naming_the_terms(mc):
    cfg = EngineConfig(model="unused")
    with pytest.raises(ValueError, match="max_model_len") as err:
        sized(cfg, mc, free=10 * GB, total=20 * GB, param_bytes=8 * GB, block_bytes=64 << 20, max_model_len=4096)
    assert "update_backup_bytes" in str(err.value) and "GB" in str(err.value)
    with pytest.raises(ValueError, match="update_backup_bytes"):
        EngineConfig(model="unused", update_backup_bytes=-1)


def test_cpu_budget_and_host_pool_defaults(mc):
    cfg = EngineConfig(model="unused", kv_cache_memory_bytes=64 << 20, max_num_seqs=4)
    assert device_kv_blocks(cfg, mc, 1 << 20, 1024, torch.device("cpu")) == 64
    assert host_kv_bytes(cfg, torch.device("cpu"), GB) == 0


def test_the_fp32_lm_head_copies_are_reserved_by_name(mc):
    base = dict(model="unused", max_num_seqs=64, max_num_batched_tokens=2048, cuda_graph_max_batch=32,
                dtype="bfloat16")
    free, total, params = 70 * GB, 80 * GB, 4 * GB
    kw = dict(block_bytes=1, max_model_len=1 << 36)     # 1-byte blocks: the count is the budget in bytes
    plain = sized(EngineConfig(**base), mc, free, total, params, **kw)
    fp32 = sized(EngineConfig(**base, fp32_lm_head=True), mc, free, total, params, **kw)
    assert plain - fp32 == (mc.vocab_size + 1) * mc.hidden_size * 4
    # a float32 model has no copies to make
    f32 = dict(base, dtype="float32")
    assert sized(EngineConfig(**f32, fp32_lm_head=True), mc, free, total, params, **kw) \
        == sized(EngineConfig(**f32), mc, free, total, params, **kw)
    with pytest.raises(ValueError, match=r"lm_head copies \(fp32_lm_head\)"):
        sized(EngineConfig(**base, fp32_lm_head=True), mc, free=10 * GB, total=20 * GB, param_bytes=8 * GB,
              block_bytes=64 << 20, max_model_len=4096)


def test_fixed_address_regions_reserve_their_rounding(mc):
    """The KV region (and the fp32 head copies' region) are rounded up to the allocation granularity after the
    sizing: the budget leaves a granule for each, so the rounded KV region still fits."""
    base = dict(model="unused", max_num_seqs=64, max_num_batched_tokens=2048, cuda_graph_max_batch=32,
                dtype="bfloat16")
    free, total, params = 70 * GB, 80 * GB, 4 * GB
    kw = dict(block_bytes=1, max_model_len=1 << 36)     # 1-byte blocks: the count is the budget in bytes
    granule = 2 << 20

    def budget(granularity, **cfg):
        return device_kv_blocks(EngineConfig(**base, **cfg), mc, kw["block_bytes"], kw["max_model_len"],
                                torch.device("cuda"), params, mem_get_info=lambda device: (free, total),
                                region_granularity=granularity)
    assert budget(0) - budget(granule) == granule
    assert budget(0, fp32_lm_head=True) - budget(granule, fp32_lm_head=True) == 2 * granule

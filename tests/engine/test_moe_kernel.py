"""engine.kernels.moe (the fused MoE path) against the torch block, engine.models.moe.SparseMoE: on the CPU under
TRITON_INTERPRET=1 (float32), natively on CUDA (bf16 tolerances). Empty experts, a single token, top-k 1 and 8,
tiles of 16-128 rows, and a whole engine run on the fused path (on CUDA inside CUDA graphs) equal to the torch
path's tokens."""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is first imported

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from engine.model_config import ModelConfig  # noqa: E402
from engine.models.moe import SparseMoE  # noqa: E402
from engine.tiny_models import make_tiny_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def block(num_experts: int, top_k: int, norm: bool, seed: int) -> SparseMoE:
    config = ModelConfig(architecture="Qwen3MoeForCausalLM", vocab_size=64, hidden_size=96, intermediate_size=64,
                         num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e4,
                         rope_scaling=None, max_position_embeddings=64, tie_word_embeddings=False,
                         attention_bias=False, qk_norm=True, num_experts=num_experts, num_experts_per_tok=top_k,
                         moe_intermediate_size=80, norm_topk_prob=norm, moe_layers=(0,))
    moe = SparseMoE(config, DTYPE).to(DEVICE)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return moe


def oracle(moe: SparseMoE, x: torch.Tensor, routing=None) -> torch.Tensor:
    """The block in float32 on ``routing`` (weights, ids), by default the torch block's: sum over j of
    w[t, j] * down[e] @ (silu(g) * u)."""
    weights, ids = routing if routing is not None else moe.route(x)
    gate_up, down, xf = moe.gate_up.float(), moe.down.float(), x.float()
    out = torch.zeros_like(xf)
    for j in range(ids.shape[1]):
        e = ids[:, j]
        gate, up = torch.einsum("th,tnh->tn", xf, gate_up[e]).chunk(2, dim=-1)       # [T, I] each
        out += weights[:, j, None].float() * torch.einsum("ti,thi->th", F.silu(gate) * up, down[e])
    return out


@pytest.mark.parametrize("num_experts,top_k,norm,tokens", [(8, 2, True, 37), (4, 1, False, 1), (16, 8, True, 20),
                                                          (64, 2, False, 5), (16, 2, True, 100), (8, 2, False, 100),
                                                          (4, 2, False, 300)])
def test_fused_equals_torch(num_experts, top_k, norm, tokens):
    moe = block(num_experts, top_k, norm, seed=num_experts + tokens)
    x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    moe.use_fused = False
    want = moe(x)
    moe.use_fused = True
    got = moe(x)
    assert moe.use_fused is True, "the fused path ran (it did not fall back)"
    if DTYPE == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:   # bf16: the paths round differently and may break routing ties apart; each is held to a float32 oracle
        from engine.kernels.moe import fused_route   # on its own routing

        fused_routing = fused_route(F.linear(x, moe.router.weight), top_k, norm)
        err_fused = (got.float() - oracle(moe, x, fused_routing)).abs().max().item()
        err_torch = (want.float() - oracle(moe, x)).abs().max().item()
        assert err_fused <= 2 * err_torch + 1e-2, (err_fused, err_torch)
    if num_experts == 64:   # most experts have no token at all
        assert len(set(moe.route(x)[1].flatten().tolist())) < num_experts


def test_another_tiling_gives_the_same_layer():
    """fused_moe with a TileConfig (what moe_gpu.py --sweep times) equals the default tiling's result."""
    from engine.kernels.moe import TileConfig, fused_moe
    from engine.models.decoder import fused_kernels

    moe = block(8, 2, True, seed=3)
    x = torch.randn(40, 96, generator=torch.Generator().manual_seed(5)).to(DEVICE, DTYPE)
    weights, ids = moe.route(x)
    silu = fused_kernels().silu_and_mul
    want = fused_moe(x, moe.gate_up, moe.down, weights, ids, silu)
    got = fused_moe(x, moe.gate_up, moe.down, weights, ids, silu,
                    config=TileConfig(block_m=32, block_n=32, block_k=32, num_warps=4, num_stages=2))
    tol = dict(rtol=1e-5, atol=1e-5) if DTYPE == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(got, want, **tol)


def test_tiles_grow_with_the_rows_per_expert():
    from engine.kernels.moe import block_m_for

    assert [block_m_for(r, 128) for r in (8, 1024, 1025, 2048, 4096, 8192, 65536)] == [16, 16, 32, 32, 64, 128, 128]
    # the last three cases of test_fused_equals_torch: 32, 64 and 128 rows a tile
    assert [block_m_for(200, 16), block_m_for(200, 8), block_m_for(600, 4)] == [32, 64, 128]


@pytest.mark.parametrize("block_m", [16, 32, 64, 128])
def test_the_tile_table_covers_every_row_once(block_m):
    from engine.kernels.moe import tile_table

    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [5, 3]] * 40, device=DEVICE)  # expert 3: 160 rows, 2, 4, 6, 7 none
    order, (expert, start, end), num_tiles = tile_table(ids, 8, block_m)
    n = int(num_tiles)
    assert n == sum(-(-c // block_m) for c in torch.bincount(ids.flatten().cpu(), minlength=8).tolist() if c)
    covered = []
    for e, s, t in zip(expert[:n].tolist(), start[:n].tolist(), end[:n].tolist()):
        rows = list(range(s, min(s + block_m, t)))
        assert all(ids.flatten()[order[r]].item() == e for r in rows)
        covered += rows
    assert sorted(covered) == list(range(ids.numel()))


@pytest.mark.parametrize("num_experts,top_k,tokens,block_m", [(8, 2, 37, 16), (4, 1, 1, 16), (128, 8, 33, 32),
                                                               (60, 4, 100, 64), (16, 8, 300, 128),
                                                               (4, 2, 2100, 128)])
def test_the_sort_kernel_equals_the_torch_sort(num_experts, top_k, tokens, block_m):
    """sort_by_expert's order is a stable sort of the slots by expert (a Python sort as the oracle), pos its
    inverse, and its tile table tile_table's (tested on its own above), with experts that get no token and a
    non-power-of-two expert count; the last case is past SORT_KERNEL_MAX_SLOTS (tile_table's sort)."""
    from engine.kernels.moe import sort_by_expert, tile_table

    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, num_experts, (tokens, top_k), generator=g).to(DEVICE)
    order, pos, table, num_tiles = sort_by_expert(ids, num_experts, block_m)
    flat = ids.flatten().tolist()
    assert order.tolist() == sorted(range(len(flat)), key=lambda i: flat[i])   # Python's sort is stable
    _, want_table, want_tiles = tile_table(ids, num_experts, block_m)
    assert torch.equal(num_tiles, want_tiles)
    n = int(want_tiles)
    for got, want in zip(table, want_table):   # past num_tiles the entries are never read
        assert torch.equal(got[:n], want[:n])
    assert torch.equal(pos.long()[order.long()], torch.arange(ids.numel(), device=DEVICE))


@pytest.mark.parametrize("num_experts,top_k,norm", [(8, 2, True), (4, 1, False), (60, 8, True), (128, 8, False)])
def test_the_route_kernel_equals_the_torch_route(num_experts, top_k, norm):
    """fused_route against SparseMoE.route on float32 logits (no ties): the same experts in the same order, the
    same weights to rounding; and on logits with ties the lowest expert comes first."""
    from engine.kernels.moe import fused_route

    moe = block(num_experts, top_k, norm, seed=num_experts)
    moe = moe.float()
    x = torch.randn(33, 96, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    want_w, want_ids = moe.route(x)
    got_w, got_ids = fused_route(torch.nn.functional.linear(x, moe.router.weight), top_k, norm)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-7)
    tied = torch.zeros(3, num_experts, device=DEVICE)
    tied[:, num_experts // 2:] = 1.0                                 # the upper half ties at the top
    _, ids = fused_route(tied, top_k, norm)
    top = list(range(num_experts // 2, num_experts // 2 + top_k))
    assert ids.tolist() == [top] * 3


def test_the_route_kernel_records_into_the_routing_table():
    """fused_route(record=...) writes what RoutedExpertStore.writer writes: each token's ids at its slot's row,
    a padding token's (slot < 0) at the scratch row."""
    from engine.kernels.moe import fused_route
    from engine.routing import RoutedExpertStore

    store = RoutedExpertStore(num_blocks=2, block_size=4, num_moe_layers=2, top_k=2, num_experts=8,
                              device=torch.device(DEVICE))
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    slots = torch.tensor([5, -1, 0], device=DEVICE)
    _, ids = fused_route(logits, 2, True, record=(slots, store.writer(1).target))
    want = torch.zeros_like(store.table)
    want[:, 1].index_copy_(0, torch.tensor([5, store.num_slots, 0], device=DEVICE), ids.to(torch.int16))
    assert torch.equal(store.table, want) and int(ids[0, 0]) != int(ids[0, 1])


class Broken:
    """A Triton kernel that fails at launch, as one that does not build under some Triton would."""
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("does not build here")
        return launch


def test_a_failing_route_kernel_falls_back_to_torch_routing(monkeypatch, caplog):
    import engine.kernels.moe as moe_kernels
    from engine.routing import RoutedExpertStore

    monkeypatch.setattr(moe_kernels, "_route_kernel", Broken())
    monkeypatch.setattr(moe_kernels, "_route_kernel_failed", False)
    store = RoutedExpertStore(num_blocks=1, block_size=4, num_moe_layers=1, top_k=2, num_experts=8,
                              device=torch.device(DEVICE))
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    weights, ids = moe_kernels.fused_route(logits, 2, True, record=(torch.tensor([2, -1, 0], device=DEVICE),
                                                                    store.writer(0).target))
    probs = torch.softmax(logits, -1)
    want_w, want_ids = probs.topk(2, dim=-1)
    assert torch.equal(ids, want_ids) and moe_kernels._route_kernel_failed and "routing kernel failed" in caplog.text
    torch.testing.assert_close(weights, want_w / want_w.sum(-1, keepdim=True))
    assert torch.equal(store.table[[2, store.num_slots, 0], 0].long(), ids)


def test_a_failing_sort_kernel_falls_back_to_the_torch_sort(monkeypatch, caplog):
    import engine.kernels.moe as moe_kernels

    monkeypatch.setattr(moe_kernels, "_sort_experts_kernel", Broken())
    monkeypatch.setattr(moe_kernels, "_sort_kernel_failed", False)
    ids = torch.tensor([[1, 0], [2, 1], [1, 3]], device=DEVICE)
    order, pos, table, num_tiles = moe_kernels.sort_by_expert(ids, 4)
    want_order, _, want_tiles = moe_kernels.tile_table(ids, 4)
    assert torch.equal(order, want_order) and torch.equal(num_tiles, want_tiles)
    assert moe_kernels._sort_kernel_failed and "MoE sort kernel failed" in caplog.text


def test_an_engine_on_the_fused_path_matches_the_torch_path(tmp_path):
    path = make_tiny_model("qwen3_moe", tmp_path / "m", seed=14)
    prompts = [[5, 6, 7, 8], list(range(30, 60))]
    params = SamplingParams(max_tokens=6, ignore_eos=True, return_routed_experts=True)
    # the reference: the torch MoE path, eager (on CUDA the default engine runs the fused path, in CUDA graphs)
    ref_engine = LLMEngine(EngineConfig(model=str(path), device=DEVICE, enable_cuda_graphs=False))
    for layer in ref_engine.model.layers:
        if layer.moe is not None:
            layer.moe.use_fused = False
    ref = ref_engine.generate(prompts, params)
    eng = LLMEngine(EngineConfig(model=str(path), device=DEVICE))   # CUDA: graphs on, the fused path captured
    moes = [layer.moe for layer in eng.model.layers if layer.moe is not None]
    for m in moes:
        m.use_fused = True
    got = eng.generate(prompts, params)
    assert all(m.use_fused is True for m in moes)
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    assert max(abs(a - b) for c, r in zip(got, ref) for a, b in zip(c.logprobs, r.logprobs)) < 1e-4
    # the routing the fused path records (inside graph replays on CUDA) is the torch path's
    for c, r in zip(got, ref):
        assert (c.routed_experts.as_array() == r.routed_experts.as_array()).all()


def test_the_moe_benchmark_runs_every_part_on_a_tiny_model(tmp_path, capsys):
    from benchmarks.moe_gpu import main

    main(["--tiny", "--no-append", "--out", str(tmp_path)])
    assert "fused ran: True" in capsys.readouterr().out and (tmp_path / "moe_gpu.json").is_file()

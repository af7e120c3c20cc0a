"""The paged decoder against transformers' own forward pass (the independent oracle), for every
supported architecture: full prefill, prefix + token-by-token decode over shuffled blocks, and one mixed
batch of chunked prefill over a cached prefix, first prefill and decode."""
from __future__ import annotations

import random

import pytest
import torch

from engine.attention import build_metadata, build_positions, get_backend
from engine.kv_cache import allocate_kv_cache, kv_bytes_per_block
from engine.tiny_models import TINY_ARCHS, make_tiny_model
from engine.weights import load_model

ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module", params=TINY_ARCHS)
def pair(request, tmp_path_factory):
    """(arch, our model, its ModelConfig, transformers model) built from one tiny checkpoint."""
    import transformers

    path = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param), seed=1)
    ours, config = load_model(path, torch.float32, "cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    return request.param, ours, config, hf


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()  # [len, vocab]


class PagedSequences:
    """Test driver: per-sequence block tables drawn from a shuffled pool, one forward per ``step``."""

    def __init__(self, model, config, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.model, self.block_size = model, block_size
        self.caches = allocate_kv_cache(config, num_blocks, block_size, torch.float32, "cpu")
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)  # non-contiguous, out-of-order block ids
        self.tables: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}
        self.backend = get_backend("reference")

    def step(self, work: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """work: (seq_id, new token ids) per sequence -> logits [len(new), vocab] per sequence."""
        query_lens, seq_lens, tables, ids = [], [], [], []
        for sid, new in work:
            done = self.computed.get(sid, 0)
            table = self.tables.setdefault(sid, [])
            while len(table) * self.block_size < done + len(new):
                table.append(self.free.pop())
            query_lens.append(len(new))
            seq_lens.append(done + len(new))
            tables.append(table)
            ids.extend(new)
            self.computed[sid] = done + len(new)
        meta = build_metadata(query_lens, seq_lens, tables, self.block_size, "cpu")
        positions = torch.from_numpy(build_positions(query_lens, seq_lens))
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids), positions, self.caches, meta, self.backend)
            logits = self.model.compute_logits(hidden)
        return list(logits.split(query_lens))


def tokens_for(seed: int, n: int, vocab: int = 512) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n,), generator=g).tolist()


def test_full_prefill_matches_transformers(pair):
    arch, model, config, hf = pair
    tokens = tokens_for(0, 37)
    run = PagedSequences(model, config, num_blocks=16, block_size=4)
    (logits,) = run.step([(0, tokens)])
    expected = hf_logits(hf, tokens)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("block_size", [4, 16])
def test_prefix_then_decode_matches_transformers(pair, block_size):
    arch, model, config, hf = pair
    tokens = tokens_for(1, 45)
    expected = hf_logits(hf, tokens)
    run = PagedSequences(model, config, num_blocks=64, block_size=block_size, seed=block_size)
    prefix = 13
    (logits,) = run.step([(0, tokens[:prefix])])
    torch.testing.assert_close(logits, expected[:prefix], atol=ATOL, rtol=0)
    for p in range(prefix, len(tokens)):
        (logits,) = run.step([(0, [tokens[p]])])
        torch.testing.assert_close(logits[0], expected[p], atol=ATOL, rtol=0, msg=f"position {p}")
    assert run.tables[0] != sorted(run.tables[0])  # the blocks really were scattered


def test_mixed_batch_matches_transformers(pair):
    """One forward holding: a chunk over a cached prefix, a decode token, a first prefill, another decode."""
    arch, model, config, hf = pair
    seqs = {0: tokens_for(10, 30), 1: tokens_for(11, 12), 2: tokens_for(12, 9), 3: tokens_for(13, 21)}
    expected = {sid: hf_logits(hf, toks) for sid, toks in seqs.items()}
    run = PagedSequences(model, config, num_blocks=48, block_size=4, seed=3)
    # step 1: cache prefixes of sequences 0, 1 and 3 (sequence 2 has not arrived yet)
    first = run.step([(0, seqs[0][:7]), (1, seqs[1][:11]), (3, seqs[3][:20])])
    for sid, n, got in zip((0, 1, 3), (7, 11, 20), first):
        torch.testing.assert_close(got, expected[sid][:n], atol=ATOL, rtol=0)
    # step 2: chunked prefill 7..19 of seq 0, decode seq 1, full prefill seq 2, decode seq 3
    work = [(0, seqs[0][7:19]), (1, seqs[1][11:12]), (2, seqs[2]), (3, seqs[3][20:21])]
    spans = {0: (7, 19), 1: (11, 12), 2: (0, 9), 3: (20, 21)}
    for (sid, _), got in zip(work, run.step(work)):
        lo, hi = spans[sid]
        torch.testing.assert_close(got, expected[sid][lo:hi], atol=ATOL, rtol=0, msg=f"sequence {sid}")
    # step 3: finish seq 0 with a chunk that crosses several blocks, decode seq 2
    for (sid, _), got, (lo, hi) in zip([(0, None), (2, None)],
                                       run.step([(0, seqs[0][19:30]), (2, tokens_for(14, 1))]),
                                       [(19, 30), (9, 10)]):
        if sid == 0:
            torch.testing.assert_close(got, expected[0][lo:hi], atol=ATOL, rtol=0)
        else:
            oracle = hf_logits(hf, seqs[2] + tokens_for(14, 1))
            torch.testing.assert_close(got, oracle[9:10], atol=ATOL, rtol=0)


def test_greedy_generation_matches_transformers(pair):
    arch, model, config, hf = pair
    prompt = tokens_for(20, 6)
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    run = PagedSequences(model, config, num_blocks=16, block_size=4)
    out, new = [], prompt
    for _ in range(12):
        (logits,) = run.step([(0, new)])
        new = [int(logits[-1].argmax())]
        out.extend(new)
    assert out == hf_out


def test_tied_embeddings_share_one_tensor(pair):
    arch, model, config, hf = pair
    shared = model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    assert shared == config.tie_word_embeddings
    assert shared == hf.config.tie_word_embeddings


def test_kv_cache_layout_and_bytes(pair):
    arch, model, config, hf = pair
    caches = allocate_kv_cache(config, 5, 16, torch.bfloat16, "cpu")
    assert len(caches) == config.num_layers
    for k, v in caches:
        assert k.shape == v.shape == (5, 16, config.num_kv_heads, config.head_dim)
        assert k.dtype == torch.bfloat16
    per_block = kv_bytes_per_block(config, 16, torch.bfloat16)
    assert per_block * 5 == sum(k.numel() * 2 + v.numel() * 2 for k, v in caches)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 128,
     "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.9, "mscale_all_dim": 0.7},
])
def test_rope_scaling_types_match_transformers(rope, tmp_path):
    import transformers

    path = make_tiny_model("llama", tmp_path, rope_parameters=rope)
    model, config = load_model(path, torch.float32, "cpu")
    assert config.rope_type == rope["rope_type"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokens = tokens_for(5, 40)
    run = PagedSequences(model, config, num_blocks=16, block_size=4)
    (prefix,) = run.step([(0, tokens[:33])])
    (tail,) = run.step([(0, tokens[33:])])
    torch.testing.assert_close(torch.cat([prefix, tail]), hf_logits(hf, tokens), atol=ATOL, rtol=0)
    # rotary tables match transformers' inv_freq / attention scaling exactly
    inv = hf.model.rotary_emb.inv_freq.float()
    freqs = torch.arange(64, dtype=torch.float32)[:, None] * inv[None, :]
    scaling = hf.model.rotary_emb.attention_scaling
    torch.testing.assert_close(model.rope_cos[:64], freqs.cos() * scaling, atol=0, rtol=0)
    torch.testing.assert_close(model.rope_sin[:64], freqs.sin() * scaling, atol=0, rtol=0)

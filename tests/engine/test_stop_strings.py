"""Stop strings: the incremental detokenizer against full decodes, the engine against an oracle that decodes
the unstopped output (first match across token boundaries, multi-byte characters, n > 1, sessions, async
scheduling), and validation. Tiny random models with SmolLM2's vocabulary and its real tokenizer."""
from __future__ import annotations

import random
import shutil

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.stop_strings import StopStringDetector
from engine.tiny_models import make_tiny_model

VOCAB = dict(vocab_size=49152, bos_token_id=1, eos_token_id=2)   # SmolLM2's: <|im_start|>, <|im_end|>
EOS = 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def oracle(tokenizer, out, stops, include=False):
    """(token ids, text, stop string) of the shortest prefix of ``out`` whose full decode holds a stop string,
    cut before the earliest-starting match (after it with ``include``); all of ``out`` when none matches."""
    for k in range(1, len(out) + 1):
        text = decode(tokenizer, out[:k])
        hits = [(text.find(s), i, s) for i, s in enumerate(stops) if s in text]
        if hits:
            start, _, s = min(hits)
            return out[:k], text[:start + (len(s) if include else 0)], s
    return out, decode(tokenizer, out), None


def with_tokenizer(path, smollm2_dir):
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def random_model(tmp_path_factory, smollm2_dir):
    path = make_tiny_model("llama", tmp_path_factory.mktemp("stop_llama"), seed=3, hidden_size=32,
                           intermediate_size=64, head_dim=8, num_hidden_layers=1, **VOCAB)
    return with_tokenizer(path, smollm2_dir)


def scripted_model(path, script, smollm2_dir):
    """A qwen2 whose greedy output after ``script[0]`` is ``script[1:]`` then EOS: every layer's output
    projection is zero (the residual stream stays the input embedding), token script[i] embeds as basis vector
    i, and the LM head maps basis vector i to script[i + 1]."""
    from safetensors.torch import load_file, save_file
    hidden = 64
    assert len(set(script)) == len(script) and len(script) < hidden, "a script needs distinct tokens"
    make_tiny_model("qwen2", path, hidden_size=hidden, num_hidden_layers=1, **VOCAB)
    weights = load_file(str(path / "model.safetensors"))
    for name, w in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w.zero_()
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    head.zero_()
    for i, tok in enumerate(script):
        embed[tok] = 0.0
        embed[tok, i] = 1.0
        head[script[i + 1] if i + 1 < len(script) else EOS, i] = 10.0
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return with_tokenizer(path, smollm2_dir)


def engine_for(path, **kw):
    cfg = dict(model=str(path), block_size=4, num_kv_blocks=256, max_num_seqs=8)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


def drive(engine):
    done, steps = [], 0
    while engine.has_unfinished():
        done += engine.step()
        engine.check_integrity()
        steps += 1
        assert steps < 1000
    return {(c.request_id, c.sample_index): c for c in done}


# ------------------------------------------------------------------ the detector alone
TEXTS = ["The cat sat on the mat, smiling 😀 at 世界 and done.", "日本語のテキスト🎉🎉 end", "a😀b🎉c 数据 x"]


@pytest.mark.parametrize("text", TEXTS)
def test_detector_text_equals_the_full_decode_token_by_token(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    d = StopStringDetector(tokenizer, ["\x00never"], False, context=tokenizer.encode("Hi:", add_special_tokens=False))
    for k, tok in enumerate(ids, 1):
        assert not d.feed([tok])
        full = decode(tokenizer, ids[:k])
        assert d.text() == full                        # a held-back partial character renders as U+FFFD, as here
        emitted = "".join(d._pieces)
        assert "\ufffd" not in emitted and full.startswith(emitted)
    assert d.text() == text and d.num_tokens == len(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_detector_finds_every_substring_at_the_oracle_token(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(len(text))
    for _ in range(25):
        a = rng.randrange(len(text))
        stop = text[a:a + rng.randrange(1, 6)]
        include = rng.random() < 0.3
        d = StopStringDetector(tokenizer, [stop, "zz"], include)
        fed = 0
        for tok in ids:
            fed += 1
            if d.feed([tok]):
                break
        want_ids, want_text, want_stop = oracle(tokenizer, ids, [stop, "zz"], include)
        assert (fed, d.text(), d.stop_string) == (len(want_ids), want_text, want_stop), stop


def test_detector_decodes_a_window_not_the_whole_output(tokenizer):
    class Counting:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, **kw):
            self.longest = max(self.longest, len(ids))
            return tokenizer.decode(ids, **kw)

    counting = Counting()
    ids = tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    d = StopStringDetector(counting, ["\x00"], False, context=ids[:10])
    assert not d.feed(ids)
    assert counting.longest <= 8 and d.text() == decode(tokenizer, ids)


def test_earliest_match_wins_and_ties_go_to_the_first_listed(tokenizer):
    ids = tokenizer.encode(" abcdef", add_special_tokens=False)
    d = StopStringDetector(tokenizer, ["def", "bc", "bcd"], False)
    d.feed(ids)
    assert (d.text(), d.stop_string) == (" a", "bc")


# ------------------------------------------------------------------ the engine
def test_engine_stops_at_the_oracle_prefix_sync_and_async(random_model, tokenizer):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randrange(2, 9))] for _ in range(6)]
    plain = engine_for(random_model, async_scheduling=False).generate(
        prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    cases = []
    for i, c in enumerate(plain):
        text = decode(tokenizer, c.token_ids)
        if i == 5:
            stops = ["\x01 never here"]                # runs to max_tokens
        else:
            a = rng.randrange(len(text) // 2)
            stops = [text[a:a + rng.randrange(2, 9)], text[a + 3:a + 30]]   # spanning 2-3 tokens, long
        cases.append((prompts[i], SamplingParams(max_tokens=24, ignore_eos=True, stop=stops,
                                                 include_stop_str_in_output=(i == 1)), c))
    results = {}
    for mode in (False, True):
        e = engine_for(random_model, async_scheduling=mode)
        for i, (p, sp, _) in enumerate(cases):
            e.add_request(p, sp, request_id=f"r{i}")
        results[mode] = drive(e)
        assert (e.stats()["steps_ahead"] > 0) == mode
        assert e.stats()["num_free_blocks"] == e.stats()["num_total_blocks"]
    for i, (p, sp, c) in enumerate(cases):
        got = results[True][(f"r{i}", 0)]
        want_ids, want_text, want_stop = oracle(tokenizer, c.token_ids, sp.stop, sp.include_stop_str_in_output)
        assert got.token_ids == want_ids and got.text == want_text and got.stop_string == want_stop, i
        assert got.finish_reason == ("length" if want_stop is None else "stop")
        assert len(got.logprobs) == len(got.versions) == len(got.token_ids)
        assert got.logprobs == pytest.approx(c.logprobs[:len(want_ids)], abs=1e-4)
        sync = results[False][(f"r{i}", 0)]
        assert (sync.token_ids, sync.text, sync.finish_reason) == (got.token_ids, got.text, got.finish_reason)
    assert sum(results[True][(f"r{i}", 0)].finish_reason == "stop" for i in range(6)) == 5


def test_n_samples_each_stop_on_their_own(random_model, tokenizer):
    e = engine_for(random_model)
    sp = SamplingParams(max_tokens=20, ignore_eos=True, temperature=1.0, seed=5, n=4)
    plain = e.generate([[5, 6, 7]], sp)
    texts = [decode(tokenizer, c.token_ids) for c in plain]
    stops = [texts[0][4:8], texts[2][10:13]]
    got = e.generate([[5, 6, 7]], SamplingParams(max_tokens=20, ignore_eos=True, temperature=1.0, seed=5, n=4,
                                                 stop=stops))
    for c, g in zip(plain, got):
        want_ids, want_text, want_stop = oracle(tokenizer, c.token_ids, stops)
        assert (g.token_ids, g.text, g.stop_string) == (want_ids, want_text, want_stop)
    assert got[0].finish_reason == "stop" and got[2].finish_reason == "stop"
    e.check_integrity()
    # A sibling whose first token (sampled with the leader's prompt row, its partial block copied) matches:
    # it finishes in the step it forks in.
    first = decode(tokenizer, plain[1].token_ids[:1])
    got = e.generate([[5, 6, 7]], SamplingParams(max_tokens=20, ignore_eos=True, temperature=1.0, seed=5, n=4,
                                                 stop=[first]))
    assert got[1].token_ids == plain[1].token_ids[:1] and got[1].text == "" and got[1].finish_reason == "stop"
    for c, g in zip(plain, got):
        assert g.token_ids == oracle(tokenizer, c.token_ids, [first])[0]
    e.check_integrity()
    assert e.stats()["num_free_blocks"] == e.stats()["num_total_blocks"]


def test_a_sessions_second_turn_stops_and_keeps_exact_tokens(random_model, tokenizer):
    e = engine_for(random_model)
    sp = SamplingParams(max_tokens=16, ignore_eos=True)
    sid = e.open_session()
    first = e.run_turn(sid, [10, 11, 12], sp)
    second_plain = e.run_turn(sid, [13, 14], sp)
    e.close_session(sid)
    text = decode(tokenizer, second_plain.token_ids)
    stop = text[6:10]

    sid = e.open_session()
    again = e.run_turn(sid, [10, 11, 12], SamplingParams(max_tokens=16, ignore_eos=True, stop=stop))
    assert again.token_ids == first.token_ids    # the stop string only occurs in the second turn
    second = e.run_turn(sid, [13, 14], SamplingParams(max_tokens=16, ignore_eos=True, stop=[stop]))
    want_ids, want_text, _ = oracle(tokenizer, second_plain.token_ids, [stop])
    assert (second.token_ids, second.text, second.finish_reason) == (want_ids, want_text, "stop")
    # The session holds exactly the tokens the model produced; a third turn continues after them.
    assert e.session_tokens(sid) == [10, 11, 12] + first.token_ids + [13, 14] + want_ids
    third = e.run_turn(sid, [15], SamplingParams(max_tokens=3, ignore_eos=True))
    assert third.text is None and third.finish_reason == "length"
    e.close_session(sid)
    e.check_integrity()


SCRIPT = "The cat sat on the mat, smiling 😀 at 世界 and done."


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, smollm2_dir, tokenizer):
    script = tokenizer.encode(":" + SCRIPT, add_special_tokens=False)
    path = scripted_model(tmp_path_factory.mktemp("stop_scripted"), script, smollm2_dir)
    return engine_for(path, num_kv_blocks=64), script


@pytest.mark.parametrize("stops, include, want_text, want_stop", [
    (["😀"], False, "The cat sat on the mat, smiling ", "😀"),          # 2 tokens, the first with a space
    (["世界"], True, "The cat sat on the mat, smiling 😀 at 世界", "世界"),  # 5 byte tokens
    (["界 and"], False, "The cat sat on the mat, smiling 😀 at 世", "界 and"),
    (["t on the m", "mat"], False, "The cat sa", "t on the m"),          # starts inside " sat", 4 tokens
    (["mat", "cat", "g 😀"], False, "The ", "cat"),
    (["not in it", "😃"], False, SCRIPT, None),                           # shares no full character
])
def test_multibyte_stops_on_a_scripted_model(scripted, tokenizer, stops, include, want_text, want_stop):
    engine, script = scripted
    prompt = [17, script[0]]
    [plain] = engine.generate([prompt], SamplingParams(max_tokens=40))
    assert plain.token_ids == script[1:] + [EOS] and decode(tokenizer, plain.token_ids) == SCRIPT
    [c] = engine.generate([prompt], SamplingParams(max_tokens=40, stop=stops, include_stop_str_in_output=include))
    want_ids, text, stop = oracle(tokenizer, plain.token_ids, stops, include)
    assert (c.text, c.stop_string) == (want_text, want_stop) == (text, stop)
    assert c.token_ids == want_ids and "\ufffd" not in c.text
    assert c.finish_reason == "stop"   # the stop string, or EOS
    assert len(c.logprobs) == len(c.token_ids) == len(c.versions)


def test_no_match_runs_to_max_tokens_and_returns_the_text(scripted, tokenizer):
    engine, script = scripted
    [c] = engine.generate([[script[0]]], SamplingParams(max_tokens=9, stop=["zebra"]))
    assert c.finish_reason == "length" and c.token_ids == script[1:10] and c.stop_string is None
    assert c.text == decode(tokenizer, script[1:10]) and c.text.endswith("\ufffd")   # cut inside 😀
    [c] = engine.generate([[script[0]]], SamplingParams(max_tokens=10, stop=["😀"]))
    assert c.finish_reason == "stop" and c.token_ids == script[1:11]   # the last token allowed completed it


def test_a_model_without_a_tokenizer_refuses_stop_strings_at_submission(tmp_path):
    e = engine_for(make_tiny_model("llama", tmp_path / "bare"))
    with pytest.raises(ValueError, match="SamplingParams.stop needs the model's tokenizer"):
        e.add_request([3, 4], SamplingParams(stop=["x"]))
    sid = e.open_session()
    with pytest.raises(ValueError, match="tokenizer"):
        e.submit_turn(sid, [3, 4], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="prompts\\[1\\]: SamplingParams.stop"):
        e.generate([[3], [4]], [SamplingParams(), SamplingParams(stop="x")])
    assert not e.has_unfinished()
    [c] = e.generate([[3, 4]], SamplingParams(max_tokens=2, stop_token_ids=(5,)))
    assert c.text is None
    e.check_integrity()


# ------------------------------------------------------------------ SamplingParams
def test_stop_is_normalised():
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams().stop == () and SamplingParams(stop=["a"]) == SamplingParams(stop=("a",))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(stop=[""]), "SamplingParams.stop[0] must be a non-empty str"),
    (dict(stop=["a", 3]), "SamplingParams.stop[1] must be a non-empty str"),
    (dict(stop=b"ab"), "SamplingParams.stop must be a str or a sequence of str"),
    (dict(stop=5), "SamplingParams.stop must be a str or a sequence of str"),
    (dict(stop=["x"] * 65), "SamplingParams.stop must hold at most 64 strings"),
    (dict(stop=["x" * 1025]), "SamplingParams.stop[0] must be at most 1024 chars"),
    (dict(stop=["\ud800"]), "SamplingParams.stop[0] must be valid Unicode"),
    (dict(include_stop_str_in_output=1), "SamplingParams.include_stop_str_in_output must be a bool"),
])
def test_stop_validation_names_the_field(kwargs, needle):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert needle in str(info.value) and len(str(info.value)) < 300


@pytest.fixture(autouse=True, scope="module")
def _threads(one_torch_thread):
    assert torch.get_num_threads() == 1

"""Stop strings over the ZeroMQ protocol: a LocalBackend on a tiny model with SmolLM2's tokenizer gives the
engine's stopped outputs (text, stop string, exact token ids) for generate and session turns; bad stop
strings get error replies and the connection keeps serving; a model without a tokenizer refuses them."""
from __future__ import annotations

import asyncio
import shutil

import msgpack
import pytest
import zmq

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.tiny_models import make_tiny_model
from rollout.backend import ErrorCode, RolloutError
from rollout.client import RolloutClient
from rollout.server import BackgroundFrontEnd

BIND = "tcp://127.0.0.1:*"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_dir):
    path = make_tiny_model("llama", tmp_path_factory.mktemp("stop_wire"), seed=4, hidden_size=32,
                           intermediate_size=64, head_dim=8, num_hidden_layers=1,
                           vocab_size=49152, bos_token_id=1, eos_token_id=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, path / name)
    return path


def raw_request(address: str, msg: dict) -> dict:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart([b"", msgpack.packb(msg, use_bin_type=True)])
        assert sock.poll(10_000), "no reply"
        return msgpack.unpackb(sock.recv_multipart()[-1], raw=False)
    finally:
        sock.close(0)


def test_stop_strings_over_the_wire_match_the_engine(model_dir):
    local = pytest.importorskip("rollout.local")
    config = EngineConfig(model=str(model_dir), num_kv_blocks=128, max_num_seqs=8, block_size=4)
    engine = LLMEngine(config)
    prompts = [[5, 6, 7], [8, 9]]
    [plain, _] = engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    text = engine.tokenizer.decode(plain.token_ids, skip_special_tokens=True)
    sp = SamplingParams(max_tokens=16, ignore_eos=True, stop=[text[8:12], "\x01never"], n=2)
    want = engine.generate(prompts, sp)
    assert want[0].finish_reason == "stop" and want[0].text == text[:text.index(text[8:12])]
    sid = engine.open_session()
    want_turns = [engine.run_turn(sid, [20, 21], SamplingParams(max_tokens=8, ignore_eos=True, stop=[text[8:12]])),
                  engine.run_turn(sid, [22], SamplingParams(max_tokens=8, ignore_eos=True, stop=["a"]))]

    backend = local.LocalBackend(config)
    try:
        with BackgroundFrontEnd(lambda: backend, BIND) as fe, RolloutClient(fe.address, timeout_s=60) as c:
            got = c.generate_batch(prompts, sp)
            assert [(t.token_ids, t.text, t.stop_string, t.finish_reason) for t in got] == \
                [(w.token_ids, w.text, w.stop_string, w.finish_reason) for w in want]
            assert all(len(t.logprobs) == len(t.token_ids) == len(t.versions) for t in got)
            s = c.open_session()
            turns = [c.step_session(s, [20, 21], SamplingParams(max_tokens=8, ignore_eos=True, stop=[text[8:12]])),
                     c.step_session(s, [22], SamplingParams(max_tokens=8, ignore_eos=True, stop="a"))]
            assert [(t.token_ids, t.text, t.finish_reason) for t in turns] == \
                [(w.token_ids, w.text, w.finish_reason) for w in want_turns]
            whole = c.close_session(s)
            assert whole.token_ids == turns[0].token_ids + [22] + turns[1].token_ids and whole.text is None
            # bad input: an error reply each, and the same server keeps serving
            for stop, code in (([3], "bad_request"), (["x"] * 17, "too_large"), (["y" * 257], "too_large"),
                               ([""], "bad_request")):
                reply = raw_request(fe.address, {"v": 2, "id": 9, "op": "generate", "prompt_ids": [5],
                                                 "params": {"stop": stop}})
                assert reply["ok"] is False and reply["error"]["code"] == code and reply["id"] == 9
                assert "params.stop" in reply["error"]["message"]
            plain_wire = c.generate([5, 6, 7], SamplingParams(max_tokens=16, ignore_eos=True))
            assert plain_wire[0].token_ids == plain.token_ids and plain_wire[0].text is None
            assert "text" not in plain_wire[0].to_dict()      # clients that predate the field still read it
    finally:
        asyncio.run(backend.shutdown())


def test_a_model_without_a_tokenizer_answers_bad_request(tmp_path):
    local = pytest.importorskip("rollout.local")
    backend = local.LocalBackend(EngineConfig(model=str(make_tiny_model("llama", tmp_path / "bare")),
                                              num_kv_blocks=32))
    try:
        with BackgroundFrontEnd(lambda: backend, BIND) as fe, RolloutClient(fe.address, timeout_s=60) as c:
            with pytest.raises(RolloutError) as info:
                c.generate([3, 4], SamplingParams(stop=["x"]))
            assert info.value.code is ErrorCode.BAD_REQUEST and "tokenizer" in str(info.value)
            assert c.generate([3, 4], SamplingParams(max_tokens=2))[0].text is None
    finally:
        asyncio.run(backend.shutdown())

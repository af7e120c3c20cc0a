"""Sessions through the real engine (LocalBackend): automatic matching by exact token prefix (/v1/completions token
and text prompts, chat whose fresh rendering reproduces a conversation's tokens), branching from an earlier turn,
streamed turns (explicit and automatic), and DELETE freeing the KV.

The oracle is the engine's own session API (``LLMEngine.open_session`` / ``run_turn``) on a second engine over the
same weights, fed token ids the test computes itself (the tokenizer, the chat template); KV reuse is read from the
serving engine's ``prefill_tokens`` counter. Models: a tiny random llama under SmolLM2's template, and the scripted
bigram (tests/rollout/scripted_model.py) under plain ChatML, whose answer re-tokenizes to the tokens it sampled."""
from __future__ import annotations

import asyncio

import pytest

from engine import LLMEngine, SamplingParams
from engine.smollm2 import chat_prompt_ids
from tests.rollout.scripted_model import SCRIPT_TEXT, make_scripted_model
from tests.rollout.test_chat_sessions import MODEL, Served, echo, engine_config, random_llama, render  # noqa: F401

# ChatML that renders every message as it is (no rewriting; ``name`` is not rendered)
PLAIN_CHATML = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
                "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
IDS = [17, 400, 1234, 99, 5000]


def greedy(max_tokens):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, smollm2_dir, one_torch_thread):
    model_dir, script = make_scripted_model(tmp_path_factory.mktemp("plain"), smollm2_dir, PLAIN_CHATML)
    served = Served(model_dir)
    yield served, LLMEngine(engine_config(model_dir)), script
    served.close()


def delta_ids(tok, messages, new, context):
    """The oracle's new tokens after a recorded turn: the new messages as the template renders them after it, with
    the turn closed as ChatML closes it (only the "\\n" when the model sampled <|im_end|>)."""
    before, after = render(tok, messages, None, False), render(tok, messages + new, None, True)
    assert after.startswith(before)
    ended = context[-1] == tok.eos_token_id
    return tok.encode(("\n" if ended else "<|im_end|>\n") + after[len(before):], add_special_tokens=False)


def sid_of(r):
    return (r.model_extra or {}).get("session_id")


def complete(served, prompt, max_tokens, **extra):
    return served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                            extra_body={"return_token_ids": True, **extra})


def test_completions_token_prompts_continue_in_the_session(random_llama):  # noqa: F811
    served, oracle = random_llama
    s = oracle.open_session()
    r1 = complete(served, IDS, 6)
    want = oracle.run_turn(s, IDS, greedy(6))
    assert r1.choices[0].token_ids == want.token_ids and sid_of(r1)
    context = IDS + want.token_ids
    new = [5, 6, 7]
    for prompt_new, max_tokens in ((new, 5), ([], 4)):              # then: the exact context, generate on
        before = served.prefill_tokens()
        r = complete(served, context + prompt_new, max_tokens)
        prefilled = served.prefill_tokens() - before
        want = oracle.run_turn(s, prompt_new, greedy(max_tokens))
        assert sid_of(r) == sid_of(r1) and r.choices[0].token_ids == want.token_ids
        # only the new tokens were computed (plus, the engine may count, the previous turn's last sampled one)
        assert prefilled == want.num_prefill_tokens and prefilled - len(prompt_new) in (0, 1)
        assert r.usage.prompt_tokens_details.cached_tokens == len(context) + len(prompt_new) - prefilled
        context += prompt_new + want.token_ids
    assert served.app.state.front.sessions.get(sid_of(r1)).token_ids == oracle.session_tokens(s) == context


def test_text_prompts_match_when_their_encoding_reproduces_the_tokens(plain):
    served, oracle, script = plain
    tok = served.tokenizer
    text1 = "<|im_start|>user\nWhat is 6*7?<|im_end|>\n<|im_start|>assistant\n"
    r1 = complete(served, text1, 40)
    s = oracle.open_session()
    assert r1.choices[0].token_ids == oracle.run_turn(s, tok.encode(text1), greedy(40)).token_ids == script
    context = tok.encode(text1) + script
    turn2 = "\n<|im_start|>user\nAgain?<|im_end|>\n<|im_start|>assistant\n"
    text2 = text1 + SCRIPT_TEXT + "<|im_end|>" + turn2
    assert tok.encode(text2)[:len(context)] == context              # the tokenizer reproduces the recorded tokens
    before = served.prefill_tokens()
    r2 = complete(served, text2, 40)
    want = oracle.run_turn(s, tok.encode(text2)[len(context):], greedy(40))
    assert sid_of(r2) == sid_of(r1) and r2.choices[0].token_ids == want.token_ids
    assert served.prefill_tokens() - before == want.num_prefill_tokens <= len(tok.encode(turn2)) + 1
    # the text without the <|im_end|> the model sampled does not start with its tokens: a new conversation
    text3 = text1 + SCRIPT_TEXT + turn2
    r3 = complete(served, text3, 40)
    assert sid_of(r3) not in (None, sid_of(r1)) and r3.prompt_token_ids == tok.encode(text3)


def test_a_chat_whose_fresh_rendering_reproduces_the_tokens_continues(plain):
    served, oracle, script = plain
    tok = served.tokenizer
    q = [{"role": "user", "content": "What is 7*8?"}]
    r1 = served.client.chat.completions.create(model=MODEL, messages=q, temperature=0.0, max_completion_tokens=40,
                                               extra_body={"return_token_ids": True})
    s = oracle.open_session()
    first = chat_prompt_ids(tok, q)
    assert r1.choices[0].token_ids == oracle.run_turn(s, first, greedy(40)).token_ids == script
    context = first + script
    # sent back with a field the messages index compares and the template does not render: no match by messages
    messages = q + [{"role": "assistant", "content": r1.choices[0].message.content, "name": "calc"},
                    {"role": "user", "content": "Again?"}]
    prompt = chat_prompt_ids(tok, messages)
    assert prompt[:len(context)] == context
    before = served.prefill_tokens()
    r2 = served.client.chat.completions.create(model=MODEL, messages=messages, temperature=0.0,
                                               max_completion_tokens=40, extra_body={"return_token_ids": True})
    want = oracle.run_turn(s, prompt[len(context):], greedy(40))
    assert r2.session_id == r1.session_id and r2.prompt_token_ids == prompt
    assert r2.choices[0].token_ids == want.token_ids
    assert served.prefill_tokens() - before == want.num_prefill_tokens <= len(prompt) - len(context) + 1
    # an edited answer renders other tokens: a fresh conversation of the full rendering, the first one intact
    edited = q + [{"role": "assistant", "content": "42."}, {"role": "user", "content": "Again?"}]
    r3 = served.client.chat.completions.create(model=MODEL, messages=edited, temperature=0.0,
                                               max_completion_tokens=40, extra_body={"return_token_ids": True})
    assert r3.session_id != r1.session_id and r3.prompt_token_ids == chat_prompt_ids(tok, edited)
    more = messages + [echo(r2.choices[0].message), {"role": "user", "content": "Once more?"}]
    r4 = served.client.chat.completions.create(model=MODEL, messages=more, temperature=0.0, max_completion_tokens=40,
                                               extra_body={"return_token_ids": True})
    assert r4.session_id == r1.session_id and r4.prompt_token_ids[:len(oracle.session_tokens(s))] == \
        oracle.session_tokens(s)


def chat(served, messages, max_tokens, **extra):
    return served.client.chat.completions.create(model=MODEL, messages=messages, temperature=0.0,
                                                 max_completion_tokens=max_tokens,
                                                 extra_body={"return_token_ids": True, **extra})


def test_branching_from_an_earlier_turn_leaves_the_later_one_intact(random_llama):  # noqa: F811
    served, oracle = random_llama
    tok = served.tokenizer
    messages = [{"role": "user", "content": "Hello there, branch"}]
    main = oracle.open_session()
    context: list[int] = []
    states = []
    for turn, max_tokens in enumerate([5, 4, 3]):
        if turn == 0:
            new_ids = chat_prompt_ids(tok, messages)
        else:
            new = [{"role": "user", "content": f"Tell me more, part {turn}."}]
            new_ids = delta_ids(tok, messages, new, context)
            messages = messages + new
        want = oracle.run_turn(main, new_ids, greedy(max_tokens))
        r = chat(served, messages, max_tokens)
        context += new_ids
        assert r.prompt_token_ids == context and r.choices[0].token_ids == want.token_ids, turn
        context += want.token_ids
        messages = messages + [echo(r.choices[0].message)]
        states.append((messages, list(context), r.session_id))
    sid = states[0][2]
    assert {state[2] for state in states} == {sid}
    # a request extending turn 1: a new conversation from turn 1's exact tokens, prefilled with the prefix cache
    m1, c1, _ = states[0]
    new = [{"role": "user", "content": "Something else."}]
    branch_ids = c1 + delta_ids(tok, m1, new, c1)
    want = oracle.run_turn(oracle.open_session(), branch_ids, greedy(4))
    before = served.prefill_tokens()
    rb = chat(served, m1 + new, 4)
    prefilled = served.prefill_tokens() - before
    assert rb.session_id != sid and rb.prompt_token_ids == branch_ids and rb.choices[0].token_ids == want.token_ids
    cached = rb.usage.prompt_tokens_details.cached_tokens
    assert prefilled == len(branch_ids) - cached and cached >= len(c1) // 4 * 4   # its full blocks (4 tokens)
    # the same branch named by the conversation's session_id: another new conversation, the same exact tokens
    rb2 = chat(served, m1 + new, 4, session_id=sid)
    assert rb2.session_id not in (sid, rb.session_id) and rb2.prompt_token_ids == branch_ids
    assert rb2.choices[0].token_ids == want.token_ids
    # the later conversation was not touched: it continues from its own latest turn, prefilling only the new tokens
    new = [{"role": "user", "content": "Go on."}]
    new_ids = delta_ids(tok, messages, new, context)
    want = oracle.run_turn(main, new_ids, greedy(3))
    before = served.prefill_tokens()
    r = chat(served, messages + new, 3)
    assert r.session_id == sid and r.prompt_token_ids == context + new_ids and r.choices[0].token_ids == want.token_ids
    assert served.prefill_tokens() - before == want.num_prefill_tokens <= len(new_ids) + 1


def streamed(chunks):
    """(session ids seen, token ids, text) of a chat stream's chunks."""
    sids = {c.model_extra.get("session_id") for c in chunks if c.choices}
    tokens = [t for c in chunks for ch in c.choices for t in (getattr(ch, "token_ids", None) or [])]
    return sids, tokens, "".join(ch.delta.content or "" for c in chunks for ch in c.choices)


def test_streamed_chat_turns_are_sessions(random_llama):  # noqa: F811
    served, oracle = random_llama
    tok = served.tokenizer
    messages = [{"role": "user", "content": "Hello there, stream"}]
    s = oracle.open_session()
    context: list[int] = []
    sid = None
    for turn, (max_tokens, how) in enumerate([(6, "stream"), (5, "stream+id"), (4, "whole")]):
        if turn == 0:
            new_ids = chat_prompt_ids(tok, messages)
        else:
            new = [{"role": "user", "content": f"Part {turn}?"}]
            new_ids = delta_ids(tok, messages, new, context)
            messages = messages + new
        want = oracle.run_turn(s, new_ids, greedy(max_tokens))
        extra = {"session_id": sid} if how == "stream+id" else {}
        before = served.prefill_tokens()
        if how == "whole":
            r = chat(served, messages, max_tokens)
            sids, tokens, text = {r.session_id}, r.choices[0].token_ids, r.choices[0].message.content
        else:
            chunks = list(served.client.chat.completions.create(
                model=MODEL, messages=messages, temperature=0.0, max_completion_tokens=max_tokens, stream=True,
                extra_body={"return_token_ids": True, **extra}))
            assert chunks[0].prompt_token_ids == context + new_ids
            sids, tokens, text = streamed(chunks)
            assert sum(bool(getattr(ch, "token_ids", None)) for c in chunks for ch in c.choices) > 1  # increments
        assert len(sids) == 1 and None not in sids and tokens == want.token_ids, turn
        assert served.prefill_tokens() - before == want.num_prefill_tokens
        if turn:
            assert sids == {sid} and want.num_prefill_tokens <= len(new_ids) + 1      # its KV was kept
        sid = sids.pop()
        context += new_ids + want.token_ids
        messages = messages + [{"role": "assistant", "content": text}]
    assert served.app.state.front.sessions.get(sid).token_ids == oracle.session_tokens(s) == context


def test_streamed_completions_continue_by_token_prefix(random_llama):  # noqa: F811
    served, oracle = random_llama
    s = oracle.open_session()
    context, sid = [], None
    for prompt_new, max_tokens in ((IDS + [8], 5), ([9, 10], 4)):
        chunks = list(served.client.completions.create(model=MODEL, prompt=context + prompt_new, max_tokens=max_tokens,
                                                       temperature=0.0, stream=True,
                                                       extra_body={"return_token_ids": True}))
        want = oracle.run_turn(s, prompt_new, greedy(max_tokens))
        sids = {ch.model_extra.get("session_id") for c in chunks for ch in c.choices}
        tokens = [t for c in chunks for ch in c.choices for t in ch.token_ids]
        assert len(sids) == 1 and None not in sids and tokens == want.token_ids
        assert sid in (None, *sids)
        sid = sids.pop()
        context += prompt_new + want.token_ids
    assert served.app.state.front.sessions.get(sid).token_ids == oracle.session_tokens(s)


def test_delete_frees_the_conversations_kv_now(random_llama):  # noqa: F811
    served, _ = random_llama
    stats = lambda: asyncio.run(served.backend.stats())["total"]  # noqa: E731
    before = stats()
    r = chat(served, [{"role": "user", "content": "Hello there, delete me"}], 6)
    held = stats()
    assert held["open_sessions"] == before["open_sessions"] + 1 and held["num_held_blocks"] > before["num_held_blocks"]
    reply = served.client.delete(f"/sessions/{r.session_id}", cast_to=object)
    assert reply == {"id": r.session_id, "object": "session", "deleted": True}
    after = stats()
    assert after["open_sessions"] == before["open_sessions"] and after["num_held_blocks"] == before["num_held_blocks"]

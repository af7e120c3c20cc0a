"""Environments: the registry, the safe calculator parser, the calculator's token-level protocol on the real
SmolLM2 tokenizer (skipped when the converted model is not cached), and the deterministic test envs."""
from fractions import Fraction

import pytest

from rollout.environment import Environment, available_environments, get_environment, register_environment
from rollout.envs.calculator import CalcError, evaluate, format_value
from rollout.envs.testing import EchoTestEnvironment, SlowEnvironment


def test_registry():
    assert {"calculator", "echo_test", "slow_test"} <= set(available_environments())
    env = get_environment("echo_test", seed=1)
    assert isinstance(env, Environment) and isinstance(env, EchoTestEnvironment)
    with pytest.raises(ValueError, match="unknown environment"):
        get_environment("nope")
    with pytest.raises(TypeError):
        get_environment("echo_test", sede=1)          # a typo is an error, not a silent default
    with pytest.raises(ValueError, match="already registered"):
        register_environment("echo_test", SlowEnvironment)
    with pytest.raises(ValueError, match="tokenizer"):
        get_environment("calculator")                  # a text env needs the model's tokenizer


@pytest.mark.parametrize("expr,value", [("1+2*3", 7), ("(1+2)*3", 9), ("-4 - -2", -2), ("7/2", Fraction(7, 2)),
                                        ("2*(3+(4-1))/3", 4), ("  12 ", 12), ("+5", 5)])
def test_calculator_evaluates(expr, value):
    assert evaluate(expr) == value


@pytest.mark.parametrize("expr", ["", "1+", "(1", "1)", "2**3", "__import__('os')", "1/0", "a+1", "1" * 300,
                                  "-" * 60 + "1", "1 2"])
def test_calculator_rejects(expr):
    with pytest.raises(CalcError):
        evaluate(expr)


def test_format_value():
    assert format_value(Fraction(8)) == "8" and format_value(Fraction(1, 3)) == "0.333333"


def test_echo_env_is_deterministic():
    a, b = EchoTestEnvironment(seed=4, num_steps=2), EchoTestEnvironment(seed=4, num_steps=2)
    assert a.reset() == b.reset() and len(a.reset()) == 8
    assert a.step([5, 6]) == ([5 * 7 % 200 + 2, (6 * 7 + 1) % 200 + 2, (5 * 7 + 2) % 200 + 2], 0.1, False)
    assert a.step([1])[2] is True
    with pytest.raises(ValueError):
        EchoTestEnvironment(num_steps=0)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def test_calculator_episode_tokens(tokenizer):
    env = get_environment("calculator", tokenizer=tokenizer, question="37 * 23 + 14")
    prompt = env.reset()
    text = tokenizer.decode(prompt)
    assert "<calc>" in text and "What is 37 * 23 + 14?" in text and text.endswith("<|im_start|>assistant\n")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    call = tokenizer.encode("Let me use <calc>37*23+14</calc>", add_special_tokens=False) + [im_end]
    obs, reward, done = env.step(call)
    assert (reward, done) == (0.0, False)
    assert tokenizer.decode(obs) == "\n<|im_start|>user\n<result>865</result><|im_end|>\n<|im_start|>assistant\n"
    # Token in, token out: the concatenation is what the chat template renders for the whole conversation.
    history = prompt + call + obs
    assert tokenizer.decode(history).endswith("Let me use <calc>37*23+14</calc><|im_end|>\n<|im_start|>user\n"
                                              "<result>865</result><|im_end|>\n<|im_start|>assistant\n")
    # A turn cut by max_tokens (no <|im_end|>) is closed by the observation.
    obs2, _, _ = env.step(tokenizer.encode("<calc>2*(3</calc>", add_special_tokens=False))
    assert tokenizer.decode(obs2).startswith("<|im_end|>\n<|im_start|>user\n<result>error:")
    final = tokenizer.encode("The answer is 865.", add_special_tokens=False) + [im_end]
    assert env.step(final) == ([], 1.0, True)


def test_calculator_rewards(tokenizer):
    env = get_environment("calculator", tokenizer=tokenizer, seed=1)
    env.reset()
    assert env.step(tokenizer.encode("I think 3.", add_special_tokens=False))[1:] == (0.0, True)
    env.reset()
    env.step(tokenizer.encode("<calc>1+1</calc>", add_special_tokens=False))
    assert env.step(tokenizer.encode("It is 3.", add_special_tokens=False))[1:] == (0.2, True)  # partial credit
    env.reset()
    answer = format_value(env.answer)
    assert env.step(tokenizer.encode(f"So it is {answer}", add_special_tokens=False))[1:] == (1.0, True)

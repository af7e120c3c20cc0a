"""A calculator tool environment for chat models (SmolLM2-class, ChatML template).

Episode::

    system: how to call the calculator        user: "What is 37 * 23 + 14?"
    assistant: "... <calc>37 * 23 + 14</calc>"          (model tokens, loss 1)
    user: "<result>865</result>"                         (observation tokens, loss 0)
    assistant: "The answer is 865."                      (model tokens, loss 1) -> done

A model turn containing ``<calc>EXPRESSION</calc>`` gets the value of the first such expression back as a
user message; a turn without a calc tag is the final answer and ends the episode.

Options: ``difficulty`` "easy" (one operation) or "hard" (two, the default); ``few_shot`` shows one
worked calculator exchange before the question (the PPO example uses easy + few-shot).

Reward (given once, on the final answer; calc turns return 0.0, so calling the tool many times earns
nothing extra):
- 1.0 if the correct value appears as a number in the final answer;
- else ``partial_credit`` (default 0.2) if the episode made at least one well-formed calc call (a tag
  whose expression parsed and evaluated): a signal small models can climb before they get answers right;
- else 0.0. An episode cut off by ``max_turns`` during tool use ends with reward 0.0.

Expressions are evaluated by a tiny recursive-descent parser (integers, ``+ - * /``, unary minus,
parentheses; exact rational arithmetic) — never ``eval``.

Token in, token out: the observation is the chat template's rendering of one user message plus the
assistant generation prompt, encoded alone and appended after the model's tokens; the history is never
re-tokenized.
"""
from __future__ import annotations

import random
import re
import threading
from fractions import Fraction
from typing import Any, Optional

SYSTEM_PROMPT = ("You are a careful assistant with a calculator. To compute something, write "
                 "<calc>EXPRESSION</calc> using integers, + - * / and parentheses, then stop; the result comes "
                 "back as <result>VALUE</result>. For example, for 12 * 7 + 3 write <calc>12 * 7 + 3</calc>. "
                 "When you know the answer, reply with the final number.")
_CALC = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
MAX_EXPRESSION_CHARS = 200

# NOTE: Hugging Face fast tokenizers are not safe to call from several threads at once ("Already borrowed"),
# and episodes' environments run concurrently on the agent loop's thread pool.
_TOKENIZER_LOCK = threading.Lock()


class CalcError(ValueError):
    pass


def evaluate(expression: str) -> Fraction:
    """Value of an arithmetic expression: integers, + - * /, unary minus, parentheses. Raises CalcError."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalcError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tokens = re.findall(r"\d+|[-+*/()]|\S", expression)
    pos = 0

    def peek() -> Optional[str]:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    # Grammar:  expr := term (("+"|"-") term)* ; term := unary (("*"|"/") unary)* ;
    #           unary := "-" unary | "+" unary | atom ;  atom := INT | "(" expr ")"
    def expr(depth: int) -> Fraction:
        value = term(depth)
        while peek() in ("+", "-"):
            value = value + term(depth) if take() == "+" else value - term(depth)
        return value

    def term(depth: int) -> Fraction:
        value = unary(depth)
        while peek() in ("*", "/"):
            if take() == "*":
                value *= unary(depth)
            else:
                divisor = unary(depth)
                if divisor == 0:
                    raise CalcError("division by zero")
                value /= divisor
        return value

    def unary(depth: int) -> Fraction:
        if depth > 50:
            raise CalcError("expression nested too deeply")
        if peek() in ("-", "+"):
            sign = take()
            value = unary(depth + 1)
            return -value if sign == "-" else value
        return atom(depth)

    def atom(depth: int) -> Fraction:
        tok = peek()
        if tok is None:
            raise CalcError("unexpected end of expression")
        take()
        if tok.isdigit():
            return Fraction(int(tok))
        if tok == "(":
            value = expr(depth + 1)
            if peek() != ")":
                raise CalcError("missing ')'")
            take()
            return value
        raise CalcError(f"unexpected {tok!r}")

    if not tokens:
        raise CalcError("empty expression")
    value = expr(0)
    if pos != len(tokens):
        raise CalcError(f"unexpected {tokens[pos]!r}")
    return value


def format_value(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.6g}"


DIFFICULTIES = ("easy", "hard")

# One worked exchange shown before the question (``few_shot=True``): small models rarely use a tool they
# have only been told about; with one example some samples do, which gives RL a signal to climb.
FEW_SHOT = [{"role": "user", "content": "What is 17 + 25?"},
            {"role": "assistant", "content": "<calc>17 + 25</calc>"},
            {"role": "user", "content": "<result>42</result>"},
            {"role": "assistant", "content": "The answer is 42."}]


def make_question(seed: int, difficulty: str = "hard") -> tuple[str, Fraction]:
    """An integer question from ``seed``: (text, exact answer). "easy": one operation on two 2-digit
    numbers; "hard": two operations."""
    rng = random.Random(seed)
    if difficulty == "easy":
        text = f"{rng.randint(10, 99)} {rng.choice('+-*')} {rng.randint(10, 99)}"
    elif difficulty == "hard":
        a, b, c = rng.randint(12, 99), rng.randint(12, 99), rng.randint(2, 60)
        op1, op2 = rng.choice("+*-"), rng.choice("+-")
        text = f"{a} {op1} {b} {op2} {c}"
    else:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    return text, evaluate(text)


class CalculatorEnvironment:
    def __init__(self, tokenizer: Any = None, *, seed: int = 0, question: Optional[str] = None,
                 partial_credit: float = 0.2, difficulty: str = "hard", few_shot: bool = False) -> None:
        if tokenizer is None:
            raise ValueError("the calculator environment needs a model with a tokenizer (chat template)")
        if not isinstance(partial_credit, (int, float)) or not 0.0 <= partial_credit <= 1.0:
            raise ValueError(f"partial_credit must be in [0, 1], got {partial_credit!r}")
        self.tokenizer = tokenizer
        self.few_shot = bool(few_shot)
        if question is None:
            self.question, self.answer = make_question(seed, difficulty)
        else:
            self.question, self.answer = question, evaluate(question)
        self.partial_credit = float(partial_credit)
        self.made_calc_call = False
        self._eos_ids = {tokenizer.convert_tokens_to_ids("<|im_end|>")} | (
            {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())

    # --------------------------------------------------------------- tokens
    def _chat_ids(self, messages: list[dict]) -> list[int]:
        from engine.smollm2 import chat_prompt_ids
        with _TOKENIZER_LOCK:
            return chat_prompt_ids(self.tokenizer, messages)

    def _user_turn_ids(self, content: str, model_ended_turn: bool) -> list[int]:
        """Ids of one more user message plus the assistant prompt, exactly as the template renders them
        after an assistant turn: the rendering of [system, user] minus that of [system]."""
        with _TOKENIZER_LOCK:
            tmpl = self.tokenizer.apply_chat_template
            head = tmpl([{"role": "system", "content": "S"}], tokenize=False)
            full = tmpl([{"role": "system", "content": "S"}, {"role": "user", "content": content}],
                        tokenize=False, add_generation_prompt=True)
            assert full.startswith(head), "chat template does not render messages independently"
            text = full[len(head):]
            # The assistant turn's end marker: sampled by the model, or closed here if it hit max_tokens.
            if not model_ended_turn:
                text = "<|im_end|>\n" + text if not text.startswith("\n") else "<|im_end|>" + text
            elif not text.startswith("\n") and head.endswith("\n"):
                text = "\n" + text
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    # --------------------------------------------------------------- protocol
    def reset(self, **kwargs: Any) -> list[int]:
        self.made_calc_call = False
        return self._chat_ids([{"role": "system", "content": SYSTEM_PROMPT}]
                              + (FEW_SHOT if self.few_shot else [])
                              + [{"role": "user", "content": f"What is {self.question}?"}])

    def step(self, model_token_ids: list[int]) -> tuple[list[int], float, bool]:
        with _TOKENIZER_LOCK:
            text = self.tokenizer.decode(model_token_ids, skip_special_tokens=True)
        match = _CALC.search(text)
        if match is None:
            return [], self.score(text), True
        try:
            result = format_value(evaluate(match.group(1)))
            self.made_calc_call = True
        except CalcError as e:
            result = f"error: {e}"
        ended = bool(model_token_ids) and model_token_ids[-1] in self._eos_ids
        return self._user_turn_ids(f"<result>{result}</result>", ended), 0.0, False

    def score(self, answer_text: str) -> float:
        for number in _NUMBER.findall(answer_text):
            try:
                if Fraction(number.replace(",", "")) == self.answer:
                    return 1.0
            except (ValueError, ZeroDivisionError):
                continue
        return self.partial_credit if self.made_calc_call else 0.0

"""Token-level deterministic environments for tests on tiny random models (no tokenizer needed).

``EchoTestEnvironment``: ``reset`` returns ``prompt_len`` ids drawn from ``random.Random(seed)``; each
``step`` returns ``obs_len`` ids derived from the model's tokens (``(t * 7 + i) % span + low``, with ``t``
cycling over the turn's tokens), reward ``(sum(model ids) % 10) / 10`` per step, ``done`` after
``num_steps`` steps. Everything is a pure function of (kwargs, model tokens), so a test can replay an
episode against a plain ``LLMEngine``.

``SlowEnvironment``: the same, but ``step`` sleeps ``delay_s`` first (a slow tool call), and so does ``reset``
(``reset_delay_s`` instead when given).
"""
from __future__ import annotations

import random
import time
from typing import Any, Optional


class EchoTestEnvironment:
    def __init__(self, tokenizer: Any = None, *, seed: int = 0, prompt_len: int = 8, obs_len: int = 3,
                 num_steps: int = 2, low: int = 2, span: int = 200) -> None:
        del tokenizer  # token-level: works on models without a tokenizer
        for name, value in (("prompt_len", prompt_len), ("obs_len", obs_len), ("num_steps", num_steps),
                            ("span", span)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.seed, self.prompt_len, self.obs_len, self.num_steps = seed, prompt_len, obs_len, num_steps
        self.low, self.span = low, span
        self.steps = 0

    def reset(self, **kwargs: Any) -> list[int]:
        self.steps = 0
        rng = random.Random(self.seed)
        return [self.low + rng.randrange(self.span) for _ in range(self.prompt_len)]

    def observation(self, model_token_ids: list[int]) -> list[int]:
        ids = model_token_ids or [0]
        return [(ids[i % len(ids)] * 7 + i) % self.span + self.low for i in range(self.obs_len)]

    @staticmethod
    def reward(model_token_ids: list[int]) -> float:
        return (sum(model_token_ids) % 10) / 10

    def step(self, model_token_ids: list[int]) -> tuple[list[int], float, bool]:
        self.steps += 1
        return (self.observation(model_token_ids), self.reward(model_token_ids), self.steps >= self.num_steps)


class SlowEnvironment(EchoTestEnvironment):
    def __init__(self, tokenizer: Any = None, *, delay_s: float = 1.0, reset_delay_s: Optional[float] = None,
                 **kwargs: Any) -> None:
        super().__init__(tokenizer, **kwargs)
        reset_delay_s = delay_s if reset_delay_s is None else reset_delay_s
        for name, value in (("delay_s", delay_s), ("reset_delay_s", reset_delay_s)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 60:
                raise ValueError(f"{name} must be a number of seconds in [0, 60], got {value!r}")
        self.delay_s = float(delay_s)
        self.reset_delay_s = float(reset_delay_s)

    def reset(self, **kwargs: Any) -> list[int]:
        time.sleep(self.reset_delay_s)
        return super().reset(**kwargs)

    def step(self, model_token_ids: list[int]) -> tuple[list[int], float, bool]:
        time.sleep(self.delay_s)
        return super().step(model_token_ids)

"""``SamplingParams``: how to sample one request, validated on construction (every error names the field).

Pure Python (no torch): the wire protocol and the clients (``rollout.protocol``, ``rollout.client``) build and
check these without the engine's dependencies. The sampler itself and the logprob semantics: ``engine.sampling``.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

# Below this temperature a row is greedy (dividing by it would overflow float32 logits anyway).
GREEDY_TEMPERATURE = 1e-5

# Stop strings: every step searches each string over a window of its length (engine/stop_strings.py), so a
# request's cost grows with count x length; these caps keep one request from slowing every step.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024



def _is_int(value: object) -> bool:
    # NOTE: bool is an int subclass; `top_k=True` is a bug, not a 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _clip(value: object) -> str:
    """An error message's view of a possibly huge value."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. Validated on construction; every error names the field."""

    temperature: float = 0.0          # 0 (or < 1e-5) = greedy
    top_p: float = 1.0                # in (0, 1]; 1 disables
    top_k: int = -1                   # -1 disables, else >= 1
    min_p: float = 0.0                # in [0, 1]; 0 disables
    max_tokens: int = 16              # new tokens to generate, >= 1
    n: int = 1                        # samples of the same prompt
    seed: int | None = None           # None = the sampler's generator; int = reproducible stream
    stop_token_ids: Sequence[int] = ()  # normalised to a tuple of non-negative ints
    ignore_eos: bool = False          # keep generating past EOS (benchmarks)
    logprobs: int | None = None       # None = no top logprobs; k >= 0 = the k most likely tokens too
    # Stop strings (a str or a sequence of them, normalised to a tuple): the sample finishes ("stop") at the
    # first token whose text completes one; the model needs a tokenizer (docs/scheduler.md, "Stop strings").
    stop: Sequence[str] = ()
    include_stop_str_in_output: bool = False  # keep the matched stop string at the end of Completion.text
    return_routed_experts: bool = False  # MoE models: Completion.routed_experts (routing replay, engine.routing)

    def __post_init__(self) -> None:
        def fail(field: str, why: str, value: object) -> None:
            raise ValueError(f"SamplingParams.{field} {why}, got {_clip(value)}")

        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            fail("temperature", "must be a finite number >= 0", t)
        p = self.top_p
        if not _is_real(p) or not (0.0 < p <= 1.0):
            fail("top_p", "must be a number in (0, 1]", p)
        k = self.top_k
        if not _is_int(k) or not (k == -1 or k >= 1):
            fail("top_k", "must be an int, -1 (disabled) or >= 1", k)
        m = self.min_p
        if not _is_real(m) or not (0.0 <= m <= 1.0):
            fail("min_p", "must be a number in [0, 1]", m)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            fail("max_tokens", "must be an int >= 1", self.max_tokens)
        if not _is_int(self.n) or self.n < 1:
            fail("n", "must be an int >= 1", self.n)
        if self.seed is not None and not _is_int(self.seed):
            fail("seed", "must be None or an int", self.seed)
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not isinstance(stops, Sequence):
            fail("stop_token_ids", "must be a sequence of ints >= 0", stops)
        for tok in stops:
            if not _is_int(tok) or tok < 0:
                fail("stop_token_ids", f"must hold only ints >= 0 (bad entry {tok!r})", stops)
        if not isinstance(self.ignore_eos, bool):
            fail("ignore_eos", "must be a bool", self.ignore_eos)
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            fail("logprobs", "must be None or an int >= 0", self.logprobs)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if isinstance(stop, bytes) or not isinstance(stop, Sequence):
            fail("stop", "must be a str or a sequence of str", self.stop)
        if len(stop) > MAX_STOP_STRINGS:
            fail("stop", f"must hold at most {MAX_STOP_STRINGS} strings (has {len(stop)})", stop)
        for i, text in enumerate(stop):
            if not isinstance(text, str) or not text:
                fail(f"stop[{i}]", "must be a non-empty str", text)
            if len(text) > MAX_STOP_STRING_CHARS:
                fail(f"stop[{i}]", f"must be at most {MAX_STOP_STRING_CHARS} chars (has {len(text)})", text)
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:   # a lone surrogate: no decoded text can ever contain it
                fail(f"stop[{i}]", "must be valid Unicode (no lone surrogates)", text)
        if not isinstance(self.include_stop_str_in_output, bool):
            fail("include_stop_str_in_output", "must be a bool", self.include_stop_str_in_output)
        if not isinstance(self.return_routed_experts, bool):
            fail("return_routed_experts", "must be a bool", self.return_routed_experts)

        # Normalise to plain Python types (numpy ints pass the checks above).
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "top_k", int(k))
        object.__setattr__(self, "min_p", float(m))
        object.__setattr__(self, "max_tokens", int(self.max_tokens))
        object.__setattr__(self, "n", int(self.n))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "stop_token_ids", tuple(int(tok) for tok in stops))
        if self.logprobs is not None:
            object.__setattr__(self, "logprobs", int(self.logprobs))
        object.__setattr__(self, "stop", tuple(str(text) for text in stop))

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

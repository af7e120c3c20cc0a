"""Validation of what callers hand the engine (token ids, sampling settings): clear errors naming the field,
before anything is queued."""
from __future__ import annotations

from collections.abc import Sequence

from engine.sampling import SamplingParams
from scheduler import ContextTooLarge


def validate_input(prompt_token_ids: object, params: object, vocab: int, max_model_len: int,
                   allow_empty: bool = False, field: str = "prompt_token_ids") -> tuple[list[int], SamplingParams]:
    """-> (token ids as a list, params). Raises TypeError / ValueError (ContextTooLarge) naming the field."""
    if params is None:
        params = SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    if isinstance(prompt_token_ids, (str, bytes)) or not isinstance(prompt_token_ids, Sequence):
        raise ValueError(f"{field} must be a list of token ids, got {type(prompt_token_ids).__name__}")
    tokens = list(prompt_token_ids)
    if not tokens and not allow_empty:
        raise ValueError(f"{field} must not be empty")
    # Fast path (C-level loops) for the common all-plain-int prompt; the per-token loop names the culprit.
    if not (all(type(t) is int for t in tokens) and (not tokens or (min(tokens) >= 0 and max(tokens) < vocab))):
        for i, t in enumerate(tokens):
            if isinstance(t, bool) or not isinstance(t, int):
                raise ValueError(f"{field}[{i}] must be an int, got {t!r}")
            if not 0 <= t < vocab:
                raise ValueError(f"{field}[{i}] = {t} is outside the vocabulary [0, {vocab})")
    if len(tokens) >= max_model_len:
        raise ContextTooLarge(f"{field} has {len(tokens)} tokens; the model's context "
                              f"(max_model_len) is {max_model_len}")
    return tokens, params

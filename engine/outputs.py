"""What the engine returns to callers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Completion:
    """One generated sample. ``generate`` returns one per sample: prompt i's n samples are
    consecutive, ordered by ``sample_index``."""

    request_id: str
    sample_index: int                    # 0 .. n-1
    prompt_token_ids: list[int]
    token_ids: list[int]                 # generated tokens (stop/EOS token included when sampled; with stop
                                         # strings, up to the token that completed the match, included)
    logprobs: list[float]                # one per token: log p(token) under log_softmax(logits / T)
    finish_reason: str                   # "stop" | "length" | "aborted"
    versions: list[int] = field(default_factory=list)  # one per token: the weight version that sampled it
    num_cached_tokens: int = 0           # prompt tokens served from the prefix cache or shared
    top_logprobs: Optional[list[list[tuple[int, float]]]] = field(default=None)  # per token, when requested
    session_id: Optional[str] = None     # set for a session turn
    num_prefill_tokens: int = 0          # context tokens computed for this request/turn
    queue_wait_s: float = 0.0            # submission to admission
    # Only for requests with stop strings (SamplingParams.stop), else None: the output's text, ending before the
    # matched stop string (after it with include_stop_str_in_output), and which stop string matched.
    text: Optional[str] = None
    stop_string: Optional[str] = None
    # Only for MoE models when SamplingParams.return_routed_experts: positions 0 .. len(prompt + tokens) - 2 (the
    # context's positions whose forward ran; the last token's never does), each MoE layer's top-k experts
    # (engine.routing.RoutedExperts); None when not asked or not available (an aborted sample off the device)
    routed_experts: Optional[Any] = None

    def __post_init__(self) -> None:
        assert len(self.token_ids) == len(self.logprobs) == len(self.versions), "one logprob and version per token"


@dataclass
class PartialOutput:
    """What one running sample generated since a caller's offset, as recorded from the steps read so far
    (``LLMEngine.partial_outputs``: progress for streaming callers). The sample's ``Completion`` follows."""

    sample_index: int
    start: int                           # output tokens before these (the caller's offset)
    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    top_logprobs: list[list[tuple[int, float]]] | None = None   # per token, when requested

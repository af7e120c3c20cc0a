"""``Trajectory``: what a rollout returns to the trainer, on every path (Ray handles, ZeroMQ)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

ENV_VERSION = -1   # ``versions`` entry of a token the environment (not the policy) produced
_OPTIONAL = ("text", "stop_string", "top_logprobs", "routed_experts")   # left out of to_dict when None


@dataclass
class Trajectory:
    """One sample of one rollout, possibly many turns.

    ``token_ids`` is everything after ``prompt_ids``: model tokens and environment observation tokens
    interleaved in the order they entered the context. The per-token lists line up with it:
    ``logprobs[i]`` (0.0 for environment tokens), ``loss_mask[i]`` (1 = sampled by the policy),
    ``versions[i]`` (the weight version that sampled it; ENV_VERSION for environment tokens).
    """

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    turns: int = 0
    finish_reason: str = ""                 # of the last turn: "stop" | "length" | "aborted" | "error"
    reward: Optional[float] = None          # when an environment gives one (summed over steps)
    metrics: dict[str, Any] = field(default_factory=dict)   # timing and cache figures (msgpack-safe values)
    request_id: str = ""
    session_id: Optional[str] = None
    sample_index: int = 0
    # Only when the turn's params had stop strings (and only on a one-turn trajectory: a generate sample or a
    # step_session turn): the output's text without the matched stop string (engine.outputs.Completion.text),
    # and which stop string matched (None when it ran to EOS or max_tokens).
    text: Optional[str] = None
    stop_string: Optional[str] = None
    # Only when the params asked for top logprobs (SamplingParams.logprobs) on a one-turn trajectory: per
    # generated token, the k most likely (token id, logprob) pairs (engine.outputs.Completion.top_logprobs).
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None
    # Only when the params asked for them (SamplingParams.return_routed_experts, MoE models): every context position
    # but the last (prompt_ids + token_ids, minus one), each MoE layer's top-k experts, in the wire form of
    # engine.routing.RoutedExperts: {"data": bytes (uint8 / uint16, C order), "shape": [P, layers, k], "dtype"}.
    # For replay in the trainer's forward (rollout.routing_replay); ``routed_experts_tensor`` unpacks it.
    routed_experts: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if not (len(self.logprobs) == len(self.loss_mask) == len(self.versions) == n):
            raise ValueError(f"Trajectory lists must line up with token_ids ({n}): logprobs {len(self.logprobs)}, "
                             f"loss_mask {len(self.loss_mask)}, versions {len(self.versions)}")
        if self.top_logprobs is not None and len(self.top_logprobs) != n:
            raise ValueError(f"Trajectory.top_logprobs must have one entry per token ({n}), has {len(self.top_logprobs)}")
        if self.routed_experts is not None:
            r = self.routed_experts
            shape = r.get("shape") if isinstance(r, dict) else None
            if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and isinstance(r.get("data"), bytes)
                    and r.get("dtype") in ("uint8", "uint16")):
                raise ValueError("Trajectory.routed_experts must be {data: bytes, shape: [P, layers, k], dtype: "
                                 f"uint8 | uint16}}, got {r!r:.120}")
            positions = len(self.prompt_ids) + n - 1
            if shape[0] != positions:
                raise ValueError(f"Trajectory.routed_experts covers {shape[0]} positions, the trajectory has "
                                 f"{positions} (every context position but the last)")

    # ---------------------------------------------------------------- building
    def add_model_tokens(self, token_ids: list[int], logprobs: list[float], versions: list[int],
                         top_logprobs: list[list[tuple[int, float]]] | None = None) -> None:
        """``top_logprobs``: one list per token (a turn that asked for them); once a trajectory has them, every
        token has an entry (``[]`` for tokens of turns that did not ask and for environment tokens)."""
        assert len(token_ids) == len(logprobs) == len(versions)
        assert top_logprobs is None or len(top_logprobs) == len(token_ids)
        if top_logprobs is not None and self.top_logprobs is None:
            self.top_logprobs = [[] for _ in self.token_ids]
        if self.top_logprobs is not None:
            self.top_logprobs.extend(top_logprobs if top_logprobs is not None else [[] for _ in token_ids])
        self.token_ids.extend(token_ids)
        self.logprobs.extend(logprobs)
        self.loss_mask.extend([1] * len(token_ids))
        self.versions.extend(versions)

    def add_env_tokens(self, token_ids: list[int]) -> None:
        if self.top_logprobs is not None:
            self.top_logprobs.extend([] for _ in token_ids)
        self.token_ids.extend(token_ids)
        self.logprobs.extend([0.0] * len(token_ids))
        self.loss_mask.extend([0] * len(token_ids))
        self.versions.extend([ENV_VERSION] * len(token_ids))

    @property
    def num_model_tokens(self) -> int:
        return sum(self.loss_mask)

    # ---------------------------------------------------------------- wire / tensors
    def to_dict(self) -> dict[str, Any]:
        """Plain lists, numbers, strings and dicts: safe for msgpack (no pickle). ``text``, ``stop_string`` and
        ``top_logprobs`` only when set (a client that predates them still reads every trajectory of a request
        that sets none of them)."""
        d = asdict(self)
        for name in _OPTIONAL:
            if d[name] is None:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trajectory":
        if not isinstance(d, dict):
            raise ValueError(f"a trajectory must be a dict, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown trajectory fields {unknown}")
        if "prompt_ids" not in d:
            raise ValueError("a trajectory needs prompt_ids")
        return cls(**d)

    def routed_experts_tensor(self):
        """``routed_experts`` as an int64 tensor [P, MoE layers, k] (None when absent)."""
        if self.routed_experts is None:
            return None
        import numpy as np
        import torch
        r = self.routed_experts
        array = np.frombuffer(r["data"], dtype=np.dtype(r["dtype"]).newbyteorder("<")).reshape(tuple(r["shape"]))
        return torch.from_numpy(array.astype(np.int64))

    def as_numpy(self) -> dict[str, Any]:
        import numpy as np
        return {"prompt_ids": np.asarray(self.prompt_ids, dtype=np.int64),
                "token_ids": np.asarray(self.token_ids, dtype=np.int64),
                "logprobs": np.asarray(self.logprobs, dtype=np.float32),
                "loss_mask": np.asarray(self.loss_mask, dtype=np.int8),
                "versions": np.asarray(self.versions, dtype=np.int64)}

    def as_torch(self) -> dict[str, Any]:
        import torch
        return {k: torch.from_numpy(v) for k, v in self.as_numpy().items()}

"""Sampling: per-request parameters and the batched sampler that turns logits into token ids.

Filtering order (the same as vLLM / Hugging Face logits warpers), applied per row:

    logits --/T--> scaled --top_k--> --top_p--> --min_p--> filtered --(exponential race)--> token

- temperature ``T``: ``scaled = logits / T``. ``T == 0`` (any ``T < 1e-5``) means greedy: the token is
  ``argmax(logits)`` (ties go to the lowest id, as ``torch.argmax``) and no filter applies.
- top_k: keep the tokens whose scaled logit is >= the k-th largest one (ties at the boundary are kept,
  so slightly more than k tokens can survive); ``-1`` disables it.
- top_p: over ``softmax(scaled)`` restricted to the top-k survivors, keep the smallest prefix (by
  decreasing probability) whose cumulative probability is >= top_p, and every token tied with its last
  one (bf16 logits tie often: which of the tied tokens a sort puts first would otherwise decide, and the
  kernel sampler keeps them all); the most likely token always survives. ``1.0`` disables it.
- min_p: drop the survivors whose probability is < ``min_p * max probability`` (a ratio, so it does not
  matter that the survivors are renormalised); ``0.0`` disables it.

Logprob semantics (what a PPO/GRPO ratio needs): the logprob returned for a sampled token is taken
under the temperature-scaled FULL-vocabulary distribution, ``log_softmax(logits / T)`` BEFORE any
top-k/top-p/min-p filtering, because that is what the trainer recomputes. For greedy rows T is taken
as 1, i.e. plain ``log_softmax(logits)``. The optional top logprobs are the largest entries of the
same distribution.

Randomness: a row with a seed draws its noise from a generator keyed by ``(seed, sample_index, step)``
only, so its token does not depend on which other rows share the batch or in which order. Rows
without a seed use the sampler's own generator. Sampling is the exponential race
``argmax(p_i / E_i)`` with ``E_i ~ Exp(1)`` iid, computed as the equivalent Gumbel-max
``argmax(filtered_i - log E_i)`` with ``E_i = -log U_i``, ``U_i ~ U[0, 1)`` (``-log E_i`` is Gumbel
noise); it picks token i with probability ``p_i`` and needs no cumsum over the vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.sampling_params import GREEDY_TEMPERATURE, SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingRow:
    """What the sampler needs to sample the next token of one sequence (one row of the logits)."""

    temperature: float
    top_k: int                 # -1 = disabled
    top_p: float               # 1.0 = disabled
    min_p: float               # 0.0 = disabled
    seed: int | None           # None = the sampler's own generator
    sample_index: int          # which of the request's n samples this sequence is
    step: int                  # index of the token being sampled within this sequence's output
    num_logprobs: int | None   # top logprobs wanted for this token (None = not asked)

    @classmethod
    def from_params(cls, params: SamplingParams, sample_index: int, step: int) -> SamplingRow:
        return cls(
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            seed=params.seed,
            sample_index=sample_index,
            step=step,
            num_logprobs=params.logprobs,
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


@dataclass
class SamplerOutput:
    """One sampled token per row, in row order."""

    token_ids: list[int]
    # log_softmax(logits / T)[token] over the full vocabulary (T = 1 for greedy rows).
    logprobs: list[float]
    # Per row the (token, logprob) pairs of the num_logprobs most likely tokens of the same
    # distribution, most likely first ([] for a row that did not ask); None when no row asked.
    top_logprobs: list[list[tuple[int, float]]] | None


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix64(*values: int) -> int:
    """Hash ints (any sign or size, reduced mod 2**64) into a generator seed in [0, 2**63)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (v & _MASK64))
    return h >> 1


class Sampler:
    """Samples one token per row of a logits batch; see the module docstring for the semantics.

    Stateful only through the generator of unseeded rows (seeded with ``seed``), one per device.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(mix64(self.seed))
            self._generators[device] = gen
        return gen

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        return self.sample(logits, rows).to_host()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> "DeviceSample":
        """Queue the sampling of every row on logits' device; nothing waits for the device (per-row settings
        go up in pinned memory with non-blocking copies). ``DeviceSample.to_host`` reads the result."""
        # logits: [R, V]
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}")
        num_rows, vocab = logits.shape
        device = logits.device
        if num_rows == 0:
            empty = torch.zeros(0, dtype=torch.float32, device=device)
            return DeviceSample(empty.long(), empty, rows, None, None, [])
        logits = logits.float()

        greedy = [r.is_greedy for r in rows]
        sampled = [i for i, g in enumerate(greedy) if not g]
        every = len(sampled) == num_rows
        if all(g or r.temperature == 1.0 for g, r in zip(greedy, rows)):
            # x / 1 == x exactly: skip a pass. NOTE: scaled may then be the caller's logits: read it, never write it.
            scaled = logits                                                   # [R, V]
        else:
            temps = upload_nonblocking([1.0 if g else r.temperature for g, r in zip(greedy, rows)],
                                       torch.float32, device)
            scaled = logits / temps[:, None]                                  # [R, V]

        # log_softmax(scaled)[tok] = scaled[tok] - logsumexp(scaled): no [R, V] logprob tensor needed. On the CPU a
        # fresh [R, V] tensor costs more in page faults than a pass over it, so one scratch serves the logsumexp and
        # then the noise.
        scratch = torch.empty(num_rows, vocab, dtype=torch.float32, device=device)  # [R, V], contiguous
        lse = _logsumexp(scaled, scratch)                                     # [R]

        tokens = None if every else scaled.argmax(dim=-1)                     # [R]; greedy rows keep it
        if sampled:
            sub_rows = [rows[i] for i in sampled]
            idx = None if every else upload_nonblocking(sampled, torch.long, device)
            filtered = scaled if every else scaled[idx]                       # [S, V]; scaled[idx] is a copy
            if _any_filter(sub_rows, vocab):
                # _apply_filters works in place on a fresh tensor (scaled is needed below)
                filtered = _apply_filters(filtered.clone() if every else filtered, sub_rows)
            noise = scratch[:len(sampled)]                                    # [S, V]
            keys = torch.sub(filtered, self._log_exponential_(noise, sub_rows), out=noise)  # filtered + Gumbel
            # max(dim).indices: the argmax, ~3x faster on the CPU (ties have probability ~0 under the noise)
            choice = keys.max(dim=-1).indices                                 # [S]
            if every:
                tokens = choice
            else:
                tokens[idx] = choice

        token_lp = scaled.gather(1, tokens[:, None]).squeeze(1) - lse

        top_vals = top_ids = None
        asked = [i for i, r in enumerate(rows) if r.num_logprobs]
        if asked:
            kmax = min(max(rows[i].num_logprobs for i in asked), vocab)
            aidx = upload_nonblocking(asked, torch.long, device)
            vals, top_ids = scaled[aidx].topk(kmax, dim=-1)                   # [A, kmax], descending
            top_vals = vals - lse[aidx, None]
        return DeviceSample(tokens, token_lp, rows, top_vals, top_ids, asked)

    def _log_exponential_(self, noise: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Fill ``noise`` [len(rows), V] with log E, E = -log U ~ Exp(1) (U ~ U[0, 1)); a seeded row's noise
        depends on (seed, sample_index, step) only. Uniforms and two logs in place cost a fifth of one
        ``exponential_`` on the CPU (~38 vs 196 ms at [256, 49152], 2 cores), and give log E directly, which is
        all the Gumbel-max needs."""
        device = noise.device
        unseeded = [i for i, r in enumerate(rows) if r.seed is None]
        if len(unseeded) == len(rows):
            noise.uniform_(generator=self._generator(device))
        elif unseeded:
            draw = torch.empty(len(unseeded), noise.shape[1], dtype=noise.dtype, device=device)
            draw.uniform_(generator=self._generator(device))
            noise[upload_nonblocking(unseeded, torch.long, device)] = draw
        for i, r in enumerate(rows):
            if r.seed is not None:
                gen = torch.Generator(device=device).manual_seed(mix64(r.seed, r.sample_index, r.step))
                noise[i].uniform_(generator=gen)
        # NOTE: guard both ends of E. E == 0 (U == 1, which [0, 1) excludes, but one rounding away) would be
        # -log E = inf, beating every real logit; E == inf (U == 0: 2**-24 per draw, about one per CPU step)
        # would be a -inf key, and a row whose only survivor drew it would pick a filtered token. Clamped,
        # the Gumbel noise -log E is finite, in [-88.8, 87.4].
        finfo = torch.finfo(noise.dtype)
        return noise.log_().neg_().clamp_(finfo.tiny, finfo.max).log_()


def _logsumexp(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(x, -1)`` [R] (the same steps, so the same bits) with ``exp(x - max)`` written into
    ``scratch`` [R, V] instead of a fresh tensor. Rows whose max is +-inf subtract 0, as torch does."""
    maxes = x.amax(dim=-1, keepdim=True)                                      # [R, 1]
    maxes.masked_fill_(maxes.abs() == math.inf, 0.0)
    return torch.sub(x, maxes, out=scratch).exp_().sum(dim=-1).log_().add_(maxes.squeeze(1))


def _any_filter(rows: list[SamplingRow], vocab: int) -> bool:
    """Whether _apply_filters would change any row (the conditions of its three steps)."""
    return any(0 < r.top_k < vocab or r.top_p < 1.0 or r.min_p > 0.0 for r in rows)


def upload_nonblocking(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without a host sync: pinned staging + non-blocking copy on CUDA (a
    pageable copy would wait for every queued kernel)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class DeviceSample:
    """Sampled tokens still on the device (``Sampler.sample``); ``to_host`` reads them."""

    token_ids: torch.Tensor            # [R] int64
    logprobs: torch.Tensor             # [R] float32
    rows: list[SamplingRow]
    top_vals: torch.Tensor | None      # [A, kmax] logprobs of the asked rows' top tokens, descending
    top_ids: torch.Tensor | None       # [A, kmax]
    asked: list[int]                   # rows that asked for top logprobs (num_logprobs > 0)

    def to_host(self) -> SamplerOutput:
        token_ids, logprobs = self.token_ids.tolist(), self.logprobs.tolist()
        return SamplerOutput(token_ids, logprobs, self.host_tops())

    def host_tops(self, vals: list | None = None, ids: list | None = None):
        """Per row the (token, logprob) pairs asked for ([] for a row that did not ask), or None when no row
        asked. ``vals`` / ``ids``: the top tensors already read to the host."""
        rows = self.rows
        if not any(r.num_logprobs is not None for r in rows):
            return None
        tops: list = [[] for _ in rows]
        if self.asked:
            vals = self.top_vals.tolist() if vals is None else vals
            ids = self.top_ids.tolist() if ids is None else ids
            for j, i in enumerate(self.asked):
                k = min(rows[i].num_logprobs, self.top_ids.shape[1])
                tops[i] = list(zip(ids[j][:k], vals[j][:k]))
        return tops


def _apply_filters(scaled: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """top_k -> top_p -> min_p on temperature-scaled logits; removed entries become -inf.

    Every step reads only its own row, so a row's result is independent of the rest of the batch.
    """
    # scaled: [S, V] (a fresh tensor, modified in place)
    device = scaled.device
    vocab = scaled.shape[1]
    neg_inf = float("-inf")

    krows = [i for i, r in enumerate(rows) if 0 < r.top_k < vocab]
    if krows:
        kidx = upload_nonblocking(krows, torch.long, device)
        ks = upload_nonblocking([rows[i].top_k for i in krows], torch.long, device)
        sub = scaled[kidx]
        top_vals = sub.topk(max(rows[i].top_k for i in krows), dim=-1).values  # [K, kmax] (host max: no sync)
        kth = top_vals.gather(1, (ks - 1)[:, None])                           # [K, 1] k-th largest
        scaled[kidx] = sub.masked_fill(sub < kth, neg_inf)

    prows = [i for i, r in enumerate(rows) if r.top_p < 1.0]
    if prows:
        pidx = upload_nonblocking(prows, torch.long, device)
        ps = upload_nonblocking([rows[i].top_p for i in prows], torch.float32, device)
        sub = scaled[pidx]
        sorted_vals = sub.sort(dim=-1, descending=True).values                # [P, V]
        probs = sorted_vals.softmax(dim=-1)
        # Exclusive prefix sum: mass strictly before position j. Keep j while that mass < top_p,
        # i.e. the smallest prefix reaching top_p; position 0 (mass 0) always survives.
        before = probs.cumsum(dim=-1).roll(1, dims=-1)
        before[:, 0] = 0.0
        kept = (before < ps[:, None]).sum(dim=-1, keepdim=True)              # [P, 1] >= 1
        boundary = sorted_vals.gather(1, kept - 1)                            # the last kept value
        scaled[pidx] = sub.masked_fill(sub < boundary, neg_inf)              # ties with it kept too

    mrows = [i for i, r in enumerate(rows) if r.min_p > 0.0]
    if mrows:
        midx = upload_nonblocking(mrows, torch.long, device)
        log_min_p = upload_nonblocking([math.log(rows[i].min_p) for i in mrows], torch.float32, device)
        sub = scaled[midx]
        # p_i < min_p * p_max  <=>  scaled_i < scaled_max + log(min_p) (the normaliser cancels).
        threshold = sub.max(dim=-1, keepdim=True).values + log_min_p[:, None]
        scaled[midx] = sub.masked_fill(sub < threshold, neg_inf)
    return scaled

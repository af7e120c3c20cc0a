"""The attention-backend interface and the per-forward metadata every backend reads.

A backend does two things for one layer in one forward pass:
  1. store the new tokens' K/V into the paged cache at ``slot_mapping``;
  2. attend every new query token over its sequence's cached prefix plus the new tokens, causally.

Prefill, chunked prefill over a cached prefix and decode are the same operation with different
``query_lens``: a decode token is a sequence whose query length is 1.

Paged KV layout, per layer (see ``engine.kv_cache``)::

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]

    token at position p of a sequence with block table bt lives at
        block  = bt[p // block_size]
        offset = p % block_size
        slot   = block * block_size + offset      (flat index into k_cache.view(-1, H_kv, D))

Ordering rule: the metadata is built by the model runner once per step, before the forward, and is
read-only for the whole forward (every layer sees the same object); a backend must not keep
references to it after ``forward`` returns.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Per-step description of the flattened batch (one entry per scheduled sequence, in the order
    their tokens appear along the flat token dimension)."""

    # Host copies, so the reference backend can loop without device syncs.
    query_lens: list[int]        # new tokens of each sequence in this step
    seq_lens: list[int]          # context length after this step = num_computed_tokens + query_len
    # Device tensors, for kernels.
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: prefix sums of query_lens (start of each seq's tokens)
    seq_lens_tensor: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor     # [num_seqs, max_blocks_per_seq] int32; padding entries are never read
    slot_mapping: torch.Tensor     # [num_tokens] int64: flat cache slot for each new token's K/V
    block_size: int
    # [N] int32, mixed-step CUDA graphs only (engine.mixed_graphs): the extend work list on the device, one
    # entry per tile of new tokens (seq << 16 | tile, -1 = none); its host lists are then placeholders and
    # the Triton backend runs the extend kernel over this list whatever the query lengths.
    extend_tiles: torch.Tensor | None = None
    # What a backend derives from this step's metadata once and reads in every layer (index tensors, masks),
    # keyed by the backend's name; it lives and dies with the metadata, so no backend keeps a step past its forward.
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # One pass over the host lists per step (backends read these per layer).
        assert len(self.query_lens) == len(self.seq_lens), "one query_len and one seq_len per sequence"
        self.max_query_len = max(self.query_lens, default=0)
        self.max_seq_len = max(self.seq_lens, default=0)
        # every sequence computes exactly one token
        self.is_decode = self.max_query_len <= 1 and self.extend_tiles is None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])


def decode_split_count(num_seqs: int, num_kv_heads: int, num_sms: int, max_splits: int,
                       max_seq_len: int | None = None, block_n: int = 64) -> int:
    """Split-K count of a paged decode: enough (sequence, kv head, split) programs to cover the SMs about
    twice, at most ``max_splits``, and, when ``max_seq_len`` is known, at least two KV tiles of ``block_n``
    per split; a power of two (few distinct compilations)."""
    n = -(-2 * num_sms // max(1, num_seqs * num_kv_heads))
    if max_seq_len is not None:
        n = min(n, -(-max_seq_len // (2 * block_n)))
    n = max(1, min(n, max_splits))
    return 1 << (n - 1).bit_length()


class AttentionBackend(ABC):
    """One implementation of paged attention. Stateless across steps; registered by name in
    ``engine.attention`` (``get_backend``)."""

    name: str = "abstract"
    # True when the backend has ``forward_rotary(q, k, v, cos, sin, k_cache, v_cache, meta, scale)``: the
    # model's rotary embedding applied inside the KV store (q rotated in place, k rotated into the cache),
    # then ``forward``'s attention. The fused-ops model path calls it instead of rotary + ``forward``.
    fuses_rotary: bool = False

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,        # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,        # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,        # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:          # [num_tokens, num_heads, head_dim]
        """Write k/v into the cache at ``meta.slot_mapping``, then return causal attention of each
        query token over positions [0, its own position] of its sequence (GQA: query head h reads
        KV head h // (num_heads // num_kv_heads))."""


# Split-KV settings of the extend kernel (engine.kernels.extend_attention, _split_range): a tile's keys are cut into
# at most EXTEND_MAX_SPLITS ranges of at least EXTEND_SPLIT_TILES KV tiles of 64 keys. Steps of more than
# EXTEND_SPLIT_MAX_TOKENS new tokens have tiles enough to fill the device, and their partials would cost the
# most memory: they do not split. The threshold is a mixed-graph bucket (engine.mixed_graphs.mixed_graph_sizes),
# so a step run eagerly and the bucket that replays it agree.
EXTEND_SPLIT_MAX_TOKENS = 1024
EXTEND_MAX_SPLITS = 1      # the default of EngineConfig.extend_kv_splits: off (slower on an H200, config.py)
EXTEND_SPLIT_TILES = 8


def extend_max_splits(num_tokens: int, max_splits: int = EXTEND_MAX_SPLITS) -> int:
    """Most KV splits an extend tile of a step of ``num_tokens`` new tokens may take (1 = none), for a setting of
    at most ``max_splits`` (``EngineConfig.extend_kv_splits``)."""
    return max(1, max_splits) if num_tokens <= EXTEND_SPLIT_MAX_TOKENS else 1


def extend_split_partial_bytes(num_tokens: int, num_heads: int, head_dim: int,
                               max_splits: int = EXTEND_MAX_SPLITS) -> int:
    """Most device bytes the split partials (float32 o and lse per token, head and split) of one extend call
    take in a step of up to ``num_tokens`` new tokens (the largest step that still splits)."""
    t = min(num_tokens, EXTEND_SPLIT_MAX_TOKENS)
    splits = extend_max_splits(t, max_splits)
    return 0 if splits == 1 or t <= 0 else t * num_heads * splits * (head_dim + 1) * 4

"""Routed experts per token, for routing replay (R3): which experts each MoE layer sent each context token to.

A MoE model's router picks experts from hidden states whose last bits depend on the batch and the kernels, so a
trainer's forward over the same tokens can pick other experts than the rollout did, and the importance ratio then
compares two different networks. The engine returns what it routed (``SamplingParams.return_routed_experts``) and
the trainer replays it (``rollout.routing_replay``).

Where it lives: beside the KV cache, one row per KV slot (``RoutedExpertStore``)::

    table  [num_blocks * block_size, num_moe_layers, top_k]   int16 (expert ids), on the KV cache's device

written by each MoE layer at the step's slot mapping as it routes (``SparseMoE.routing_sink``), so a context
position has its routing wherever its KV came from: this request's prefill, a prefix-cache hit computed by another
request, a session's earlier turn, a fork's copied block, a host offload and restore (the rows travel with the
blocks: ``copy_blocks``, ``offload``, ``restore``), a recompute after a weight update (rewritten with the KV).
``read`` gathers a finished sequence's positions through its block table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from engine.sampling import upload_nonblocking


@dataclass(frozen=True)
class RoutedExperts:
    """Positions 0..P-1 of a sequence: the top-k expert ids of every MoE layer, [P, L, k], in the router's order
    (descending probability). Stored compactly (uint8 when every id < 256, else uint16; C order) so it travels as
    bytes through Ray and msgpack: ``to_wire`` / ``from_wire``."""

    data: bytes
    shape: tuple[int, int, int]     # (positions, MoE layers, top_k)
    dtype: str                      # "uint8" | "uint16"

    @classmethod
    def from_array(cls, ids: np.ndarray, num_experts: int) -> "RoutedExperts":
        assert ids.ndim == 3, f"routed experts are [positions, layers, k], got shape {ids.shape}"
        dtype = "uint8" if num_experts <= 256 else "uint16"
        return cls(np.ascontiguousarray(ids.astype(dtype)).tobytes(), tuple(int(s) for s in ids.shape), dtype)

    def as_array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(self.shape)

    def as_tensor(self) -> torch.Tensor:
        """[P, L, k] int64."""
        return torch.from_numpy(self.as_array().astype(np.int64))

    def to_wire(self) -> dict:
        return {"data": self.data, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_wire(cls, d: dict) -> "RoutedExperts":
        if not isinstance(d, dict) or set(d) != {"data", "shape", "dtype"}:
            raise ValueError(f"routed_experts must be a dict with data, shape and dtype, got {d!r:.120}")
        shape = tuple(d["shape"])
        if d["dtype"] not in ("uint8", "uint16") or len(shape) != 3 or not all(isinstance(s, int) and s >= 0
                                                                               for s in shape):
            raise ValueError(f"routed_experts: bad dtype {d['dtype']!r} or shape {shape!r}")
        if not isinstance(d["data"], bytes) or len(d["data"]) != int(np.prod(shape)) * np.dtype(d["dtype"]).itemsize:
            raise ValueError(f"routed_experts: {len(d['data'])} bytes do not hold a {d['dtype']} array of {shape}")
        return cls(d["data"], shape, d["dtype"])


def write_routing(column: torch.Tensor, scratch: int, slots: torch.Tensor, ids: torch.Tensor) -> None:
    """column [num_slots + 1, k] int16 (one MoE layer's): the row of each slot gets its token's ids; slots < 0 (a
    graph's padding) write the scratch row, so the write needs no mask (a boolean index would read the device)."""
    column.index_copy_(0, torch.where(slots >= 0, slots, torch.full_like(slots, scratch)), ids.to(torch.int16))


class RoutedExpertStore:
    """The per-slot routing table of one engine (see the module docstring). The engine's only writer of it is the
    model's MoE layers (through ``writer``) and this class's block moves."""

    def __init__(self, num_blocks: int, block_size: int, num_moe_layers: int, top_k: int, num_experts: int,
                 device: torch.device, num_host_blocks: int = 0) -> None:
        self.block_size, self.num_layers, self.top_k, self.num_experts = block_size, num_moe_layers, top_k, num_experts
        # one scratch row past the slots: where padding tokens (slot < 0) write, so the write needs no mask (a boolean
        # index would read the device on CUDA, once per MoE layer per step)
        self.num_slots = num_blocks * block_size
        self.table = torch.zeros(self.num_slots + 1, num_moe_layers, top_k, dtype=torch.int16, device=device)
        # offloaded blocks' rows, by host block (same layout, on the host)
        self.host = torch.zeros(num_host_blocks * block_size, num_moe_layers, top_k, dtype=torch.int16)
        # offloads whose device->host copy is queued and not yet scattered into ``host``: (staging, host rows, event)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, object]] = []

    def writer(self, layer: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
        """For MoE layer ``layer`` (0-based among the MoE layers): (slots [T] int64, ids [T, k]) -> written; slots
        < 0 (a graph's padding) are skipped."""
        column = self.table[:, layer]                                   # [num_slots + 1, k] view
        scratch = self.num_slots

        def write(slots: torch.Tensor, ids: torch.Tensor) -> None:
            write_routing(column, scratch, slots, ids)
        # what a kernel needs to do the same write itself (engine.kernels.moe.fused_route): the int16 column
        # [num_slots + 1, k] and the scratch row for slots < 0
        write.target = (column, scratch)
        return write

    def _slots(self, blocks: Sequence[int], device) -> torch.Tensor:
        # on CUDA through pinned staging: a pageable upload would wait for every kernel queued before it
        b = upload_nonblocking(list(blocks), torch.int64, torch.device(device))
        return (b[:, None] * self.block_size + torch.arange(self.block_size, device=device)).reshape(-1)

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Device block src -> dst (a forked sibling's partial block), as the KV copy does."""
        if copies:
            src = self._slots([s for s, _ in copies], self.table.device)
            dst = self._slots([d for _, d in copies], self.table.device)
            self.table.index_copy_(0, dst, self.table.index_select(0, src))

    def offload(self, swap_out: Sequence[tuple[int, int]]) -> None:
        """(device block, host block) pairs: the rows go to the host with the KV. On CUDA the copy is queued on the
        current stream into pinned memory (no wait); it lands in ``host`` at the next restore."""
        if not swap_out:
            return
        rows = self.table.index_select(0, self._slots([d for d, _ in swap_out], self.table.device))
        host_rows = self._slots([h for _, h in swap_out], "cpu")
        if rows.device.type != "cuda":
            self.host.index_copy_(0, host_rows, rows)
            return
        staging = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        staging.copy_(rows, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((staging, host_rows, event))

    def _land(self) -> None:
        """Scatter the queued offloads into ``host``, oldest first (a later offload of a host block wins)."""
        for staging, host_rows, event in self._pending:
            event.synchronize()
            self.host.index_copy_(0, host_rows, staging)
        self._pending.clear()

    def restore(self, swap_in: Sequence[tuple[int, int]]) -> None:
        """(host block, device block) pairs: the rows come back with the KV."""
        if swap_in:
            self._land()
            rows = self.host.index_select(0, self._slots([h for h, _ in swap_in], "cpu"))
            if self.table.device.type == "cuda":
                rows = rows.pin_memory().to(self.table.device, non_blocking=True)   # no wait for queued kernels
            self.table.index_copy_(0, self._slots([d for _, d in swap_in], self.table.device), rows)

    def read(self, block_ids: Sequence[int], num_positions: int) -> RoutedExperts:
        """Positions [0, num_positions) of a sequence with this block table (host read: syncs the device)."""
        assert num_positions <= len(block_ids) * self.block_size, "the block table covers the positions"
        slots = self._slots(block_ids, self.table.device)[:num_positions]
        ids = self.table.index_select(0, slots).cpu().numpy()
        return RoutedExperts.from_array(ids, self.num_experts)


__all__ = ["RoutedExpertStore", "RoutedExperts"]

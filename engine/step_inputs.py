"""Per-step model inputs built with numpy into one persistent (pinned) host buffer, sent in one H2D copy.

What a step needs on the device, for T new tokens of B sequences (block tables w blocks wide)::

    input_ids      int64 [T]      the new tokens, flat in scheduled order
    positions      int64 [T]      start_pos_i .. seq_len_i - 1 for sequence i
    slot_mapping   int64 [T]      bt[p // block_size] * block_size + p % block_size   (-1: padding row)
    seq_lens       int32 [B]      context length after the step (0: padding row)
    query_start_loc int32 [B + 1] prefix sums of the query lengths
    block_tables   int32 [B, w]   entries past a sequence's own blocks are never read
    sample_rows    int64 [R]      flat row of the last token of each sampling sequence (eager steps)

Byte layout of the staging buffer, each section 16-byte aligned. 8 would do for viewing the buffer per dtype,
but Triton specializes a kernel on whether each pointer argument is 16-byte aligned: with sections whose
alignment followed T and B, every new alignment class compiled (or loaded) the attention and KV-store kernels
again in the middle of a run. At 16 every step has one class, the one warmed up at load::

    | input_ids | positions | slot_mapping | seq_lens | query_start_loc | sample_rows | block_tables |

Eager steps size the sections to the step (T, B, R); CUDA-graph decode steps size the first five to the
captured batch ``G`` (the graph's static inputs live at fixed offsets of the graph's device buffer) and
send the block tables compact ([bs, w]), to be widened on the device into the graph's [G, W] table.

NOTE: the host buffer is rewritten by the next ``prepare``, while the previous step's non-blocking H2D copy
may still be queued (a step whose items do not sample, a middle prefill chunk, has no host sync). So each
copy records a CUDA event and the next rewrite waits on it: the buffer owns its reuse fence.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import numpy as np
import torch

from engine.attention.base import AttentionMetadata
from scheduler import ScheduledSequence


def _align16(n: int) -> int:
    return (n + 15) & ~15


@dataclass
class Layout:
    """Byte offsets of the sections; sizes in elements."""

    num_tokens: int
    num_seqs: int
    num_sample_rows: int
    width: int  # block-table width (blocks)
    num_tiles: int = 0  # extend work-list entries (mixed-step graphs only), between rows and tables

    def __post_init__(self) -> None:
        t, b = self.num_tokens, self.num_seqs
        self.ids = 0
        self.pos = _align16(self.ids + 8 * t)
        self.slots = _align16(self.pos + 8 * t)
        self.seq_lens = _align16(self.slots + 8 * t)
        self.qsl = _align16(self.seq_lens + 4 * b)
        self.rows = _align16(self.qsl + 4 * (b + 1))
        self.tiles = _align16(self.rows + 8 * self.num_sample_rows)
        self.tables = _align16(self.tiles + 4 * self.num_tiles)
        self.nbytes = _align16(self.tables + 4 * b * self.width)


def extend_tiles(query_lens: np.ndarray, tile_tokens: int, out: np.ndarray) -> int:
    """Write the extend work list of a step into ``out`` (int32): for sequence i with q_i new tokens, entries
    i << 16 | j for its tiles j < cdiv(q_i, tile_tokens), in order; the rest of ``out`` gets -1.
    -> the number of real entries. A sequence of q tokens has cdiv(q, tile_tokens) tiles, so T tokens over B
    sequences need at most cdiv(T, tile_tokens) + B entries."""
    counts = -(-query_lens // tile_tokens)                        # [B] tiles per sequence
    total = int(counts.sum())
    if total > out.shape[0]:
        raise ValueError(f"{total} extend tiles do not fit a work list of {out.shape[0]}")
    if query_lens.shape[0] > 1 << 15 or int(counts.max(initial=0)) > 1 << 16:
        raise ValueError("extend tiles pack the sequence in 15 bits and the tile in 16")
    seq = np.repeat(np.arange(query_lens.shape[0], dtype=np.int64), counts)
    tile = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    out[:total] = (seq << 16) | tile
    out[total:] = -1
    return total


def _view(buf, offset: int, count: int, dtype):
    """A typed view of ``count`` elements at byte ``offset`` of a uint8 numpy array or torch tensor."""
    if isinstance(buf, np.ndarray):
        return buf[offset:offset + count * np.dtype(dtype).itemsize].view(dtype)
    tdtype = {np.int64: torch.int64, np.int32: torch.int32}[dtype]
    return buf[offset:offset + count * np.dtype(dtype).itemsize].view(tdtype)


@dataclass
class StepTensors:
    """Device tensors of one step (views of the step buffer) plus the host facts the runner needs."""

    input_ids: torch.Tensor     # [T] int64
    positions: torch.Tensor     # [T] int64
    meta: AttentionMetadata
    sample_rows: torch.Tensor   # [R] int64
    sample_items: list[int]     # index into the scheduled items of each sample row


class _BlockTableCache:
    """The host block table of the last step, patched in place when the next step runs the same
    sequences in the same order (the common decode case): only rows that gained a block are written.

    Safe because a block id never changes while a sequence holds it, and every path that replaces a
    sequence's blocks (preemption, KV recompute, offload and restore) runs a prefill chunk or starts a new
    turn first (``num_output_tokens == 0``), which rebuilds the table."""

    def __init__(self) -> None:
        self.seq_ids: tuple[int, ...] = ()
        self.lens = np.zeros(0, np.int64)
        self.table = np.zeros((0, 0), np.int32)

    def build(self, items: Sequence[ScheduledSequence]) -> np.ndarray:
        """-> [B, w] int32, w = the longest block list (at least 1)."""
        lens = np.fromiter((len(it.block_ids) for it in items), dtype=np.int64, count=len(items))
        seq_ids = tuple(it.seq_id for it in items)
        width = max(1, int(lens.max(initial=0)))
        reusable = (seq_ids == self.seq_ids and width <= self.table.shape[1]
                    and all(it.num_tokens == 1 and it.num_output_tokens > 0 for it in items)
                    and bool(np.all(lens >= self.lens)))
        if reusable:
            for i in np.flatnonzero(lens != self.lens).tolist():
                old, new = int(self.lens[i]), int(lens[i])
                self.table[i, old:new] = items[i].block_ids[old:new]
        else:
            # 25% slack in width so sequences growing by a block rarely force a rebuild
            cap = width + (width >> 2) + 1
            table = np.zeros((len(items), cap), np.int32)  # padding (0) is never read
            flat = np.fromiter(chain.from_iterable(it.block_ids for it in items), dtype=np.int32,
                               count=int(lens.sum()))
            rows = np.repeat(np.arange(len(items)), lens)
            starts = np.cumsum(lens) - lens
            cols = np.arange(flat.shape[0]) - np.repeat(starts, lens)
            table[rows, cols] = flat
            self.table = table
        self.seq_ids, self.lens = seq_ids, lens
        return self.table[:, :width]


class StepInputs:
    """Builds the step tensors; one owner of the staging buffers (one per ModelRunner)."""

    def __init__(self, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.device = device
        self._pin = device.type == "cuda"
        self._host = torch.empty(0, dtype=torch.uint8)
        self._dev = self._host
        self._tables = _BlockTableCache()
        self._copied: torch.cuda.Event | None = None   # the last H2D copy out of the host buffer, if pending
        self._fence: torch.cuda.Event | None = None

    def _buffers(self, nbytes: int) -> tuple[np.ndarray, torch.Tensor]:
        if self._copied is not None:
            self._copied.synchronize()     # the previous step's copy has read the host buffer
            self._copied = None
        if self._host.numel() < nbytes:
            cap = max(nbytes, 2 * self._host.numel(), 1 << 16)
            self._host = torch.empty(cap, dtype=torch.uint8, pin_memory=self._pin)
            self._dev = torch.empty(cap, dtype=torch.uint8, device=self.device) if self._pin else self._host
        return self._host.numpy(), self._dev

    def _fill(self, host: np.ndarray, lay: Layout, items: Sequence[ScheduledSequence], num_tokens: int,
              table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write ids, positions, slots, seq_lens, query_start_loc and the compact block table of the real
        rows. -> (query_lens, seq_lens) as int64 arrays."""
        n = len(items)
        q = np.fromiter((it.num_tokens for it in items), dtype=np.int64, count=n)
        start = np.fromiter((it.start_pos for it in items), dtype=np.int64, count=n)
        seq_lens = start + q
        self._check(q, seq_lens, items)  # before the slot gather indexes the table
        ids = _view(host, lay.ids, num_tokens, np.int64)
        if n == num_tokens:  # decode-only: one token each, no flattening needed
            ids[:] = np.fromiter((it.token_ids[0] for it in items), dtype=np.int64, count=n)
            pos = start
            seq_idx = np.arange(n)
        else:
            ids[:] = np.fromiter(chain.from_iterable(it.token_ids for it in items), dtype=np.int64,
                                 count=num_tokens)
            # token j of sequence i (flat index qstart_i + j) sits at position start_i + j
            qstart = np.cumsum(q) - q
            pos = np.arange(num_tokens, dtype=np.int64) - np.repeat(qstart - start, q)
            seq_idx = np.repeat(np.arange(n), q)
        _view(host, lay.pos, num_tokens, np.int64)[:] = pos
        bs = self.block_size
        _view(host, lay.slots, num_tokens, np.int64)[:] = table[seq_idx, pos // bs].astype(np.int64) * bs + pos % bs
        _view(host, lay.seq_lens, n, np.int32)[:] = seq_lens
        qsl = _view(host, lay.qsl, n + 1, np.int32)
        qsl[0] = 0
        np.cumsum(q, out=qsl[1:])
        return q, seq_lens

    def _check(self, q: np.ndarray, seq_lens: np.ndarray, items: Sequence[ScheduledSequence]) -> None:
        needed = -(-seq_lens // self.block_size)
        lens = self._tables.lens
        if np.any(q <= 0) or np.any(lens < needed):
            i = int(np.flatnonzero((q <= 0) | (lens < needed))[0])
            raise ValueError(f"scheduled item {i} (seq {items[i].seq_id}): query_len {q[i]}, seq_len "
                             f"{seq_lens[i]} needs {needed[i]} blocks of {self.block_size}, has {lens[i]}")

    def prepare(self, items: Sequence[ScheduledSequence], num_tokens: int) -> StepTensors:
        """Eager step: sections sized to this step; one H2D copy (none on CPU)."""
        n = len(items)
        table = self._tables.build(items)
        sample_items = [i for i, it in enumerate(items) if it.sample]
        lay = Layout(num_tokens, n, len(sample_items), table.shape[1])
        host, dev = self._buffers(lay.nbytes)
        q, seq_lens = self._fill(host, lay, items, num_tokens, table)
        ends = np.cumsum(q) - 1
        _view(host, lay.rows, len(sample_items), np.int64)[:] = ends[sample_items]
        _view(host, lay.tables, table.size, np.int32).reshape(table.shape)[:] = table
        if dev is not self._host:
            dev[:lay.nbytes].copy_(self._host[:lay.nbytes], non_blocking=True)
            self._record_copy()
        meta = AttentionMetadata(
            query_lens=q.tolist(), seq_lens=seq_lens.tolist(),
            query_start_loc=_view(dev, lay.qsl, n + 1, np.int32),
            seq_lens_tensor=_view(dev, lay.seq_lens, n, np.int32),
            block_tables=_view(dev, lay.tables, table.size, np.int32).view(table.shape),
            slot_mapping=_view(dev, lay.slots, num_tokens, np.int64),
            block_size=self.block_size,
        )
        return StepTensors(_view(dev, lay.ids, num_tokens, np.int64), _view(dev, lay.pos, num_tokens, np.int64),
                           meta, _view(dev, lay.rows, len(sample_items), np.int64), sample_items)

    def prepare_graph_decode(self, items: Sequence[ScheduledSequence], graph_inputs: "GraphInputs",
                             batch: int) -> None:
        """Decode step under a CUDA graph captured for ``batch`` >= len(items) rows: fill the graph's static
        inputs (rows past the real ones are padding: slot -1, seq_len 0) with one H2D copy plus one device
        copy that widens the compact block table into the graph's [G, W] table."""
        n = len(items)
        table = self._graph_table(items, graph_inputs.max_blocks)
        width = table.shape[1]
        lay = graph_inputs.layout
        nbytes = lay.tables + 4 * batch * width
        host, dev = self._buffers(nbytes)
        self._fill(host, lay, items, n, table)
        _view(host, lay.qsl, batch + 1, np.int32)[:] = np.arange(batch + 1, dtype=np.int32)
        _view(host, lay.ids, batch, np.int64)[n:] = 0
        _view(host, lay.pos, batch, np.int64)[n:] = 0
        _view(host, lay.slots, batch, np.int64)[n:] = -1
        _view(host, lay.seq_lens, batch, np.int32)[n:] = 0
        compact = _view(host, lay.tables, batch * width, np.int32).reshape(batch, width)
        compact[:n] = table
        compact[n:] = 0
        graph_inputs.load(self._host[:nbytes], batch, width)
        self._record_copy()

    def prepare_graph_mixed(self, items: Sequence[ScheduledSequence], num_tokens: int,
                            graph_inputs: "MixedGraphInputs", bucket: int) -> StepTensors:
        """A step with prefill chunks (or any eager-shaped step) under the mixed-step CUDA graph of ``bucket``
        >= num_tokens tokens: fill the graph's static inputs (tokens past the real ones: slot -1; sequences
        past the real ones: no new tokens, seq_len 0; the extend work list padded with -1) with one H2D copy
        plus one device copy that widens the compact block table. Returns the step's views of the static
        inputs, with ``sample_rows`` (read outside the graph)."""
        n = len(items)
        table = self._graph_table(items, graph_inputs.max_blocks)
        width = table.shape[1]
        assert num_tokens <= bucket <= graph_inputs.max_tokens and n <= graph_inputs.max_seqs
        lay = graph_inputs.layout
        nbytes = lay.tables + 4 * n * width
        host, dev = self._buffers(nbytes)
        q, seq_lens = self._fill(host, lay, items, num_tokens, table)
        _view(host, lay.ids, bucket, np.int64)[num_tokens:] = 0
        _view(host, lay.pos, bucket, np.int64)[num_tokens:] = 0
        _view(host, lay.slots, bucket, np.int64)[num_tokens:] = -1
        _view(host, lay.seq_lens, graph_inputs.max_seqs, np.int32)[n:] = 0
        _view(host, lay.qsl, graph_inputs.max_seqs + 1, np.int32)[n + 1:] = num_tokens
        sample_items = [i for i, it in enumerate(items) if it.sample]
        ends = np.cumsum(q) - 1
        _view(host, lay.rows, len(sample_items), np.int64)[:] = ends[sample_items]
        extend_tiles(q, graph_inputs.tile_tokens, _view(host, lay.tiles, graph_inputs.tiles_for(bucket), np.int32))
        _view(host, lay.tables, n * width, np.int32).reshape(n, width)[:] = table
        graph_inputs.load(self._host[:nbytes], n, width)
        self._record_copy()
        meta = graph_inputs.metadata(bucket)
        return StepTensors(graph_inputs.input_ids[:bucket], graph_inputs.positions[:bucket], meta,
                           _view(graph_inputs.buffer, lay.rows, len(sample_items), np.int64), sample_items)

    def _graph_table(self, items: Sequence[ScheduledSequence], max_blocks: int) -> np.ndarray:
        """The compact block table of a graph step; a ValueError when a sequence is wider than the capture."""
        table = self._tables.build(items)
        if table.shape[1] > max_blocks:
            raise ValueError(f"a sequence needs {table.shape[1]} blocks; the graphs were captured for "
                             f"{max_blocks} (max_model_len)")
        return table

    def _record_copy(self) -> None:
        if self._pin:
            if self._fence is None:
                self._fence = torch.cuda.Event()   # one event, re-recorded each step
            self._fence.record()
            self._copied = self._fence


class GraphInputs:
    """The static device inputs of the decode CUDA graphs (captured on views of these, so their addresses
    never change), for up to ``max_batch`` rows and ``max_blocks`` blocks per sequence."""

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, device: torch.device) -> None:
        self.max_batch, self.max_blocks = max_batch, max_blocks
        self.layout = Layout(max_batch, max_batch, 0, 0)  # tables section = compact staging (variable)
        lay = self.layout
        staging = lay.tables + 4 * max_batch * max_blocks
        self.buffer = torch.zeros(staging, dtype=torch.uint8, device=device)
        self.block_tables = torch.zeros((max_batch, max_blocks), dtype=torch.int32, device=device)
        g = max_batch
        self.input_ids = _view(self.buffer, lay.ids, g, np.int64)
        self.positions = _view(self.buffer, lay.pos, g, np.int64)
        self.slot_mapping = _view(self.buffer, lay.slots, g, np.int64)
        self.seq_lens = _view(self.buffer, lay.seq_lens, g, np.int32)
        self.query_start_loc = _view(self.buffer, lay.qsl, g + 1, np.int32)
        self.slot_mapping.fill_(-1)
        self.query_start_loc.copy_(torch.arange(g + 1, dtype=torch.int32, device=device))  # one token per row
        self.block_size = block_size

    def metadata(self, batch: int) -> AttentionMetadata:
        """Metadata over the first ``batch`` rows. Its host lists are placeholders (every row a 1-token
        decode): a graph-captured backend must not read host seq_lens (TritonBackend with fixed splits)."""
        return AttentionMetadata(
            query_lens=[1] * batch, seq_lens=[1] * batch,
            query_start_loc=self.query_start_loc[:batch + 1], seq_lens_tensor=self.seq_lens[:batch],
            block_tables=self.block_tables[:batch], slot_mapping=self.slot_mapping[:batch],
            block_size=self.block_size)

    def load(self, staged: torch.Tensor, batch: int, width: int) -> None:
        """staged: the host bytes [fixed header | compact tables [batch, width]] built by StepInputs."""
        nbytes = staged.numel()
        self.buffer[:nbytes].copy_(staged, non_blocking=True)
        lay = self.layout
        compact = _view(self.buffer, lay.tables, batch * width, np.int32).view(batch, width)
        self.block_tables[:batch, :width].copy_(compact)


class MixedGraphInputs:
    """The static device inputs of the mixed-step CUDA graphs (``engine.mixed_graphs``): up to ``max_tokens``
    new tokens of up to ``max_seqs`` sequences, block tables ``max_blocks`` wide, and the extend work list
    (``extend_tiles``) for tiles of ``tile_tokens`` tokens. The graph of a bucket of T tokens reads the first T
    token entries, every sequence entry (those past a step's own have no new tokens) and the first
    ``tiles_for(T)`` work-list entries."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, block_size: int, tile_tokens: int,
                 device: torch.device) -> None:
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks
        self.tile_tokens = tile_tokens
        self.block_size = block_size
        self.layout = Layout(max_tokens, max_seqs, max_seqs, 0, num_tiles=self.tiles_for(max_tokens))
        lay = self.layout
        self.buffer = torch.zeros(lay.tables + 4 * max_seqs * max_blocks, dtype=torch.uint8, device=device)
        self.block_tables = torch.zeros((max_seqs, max_blocks), dtype=torch.int32, device=device)
        self.input_ids = _view(self.buffer, lay.ids, max_tokens, np.int64)
        self.positions = _view(self.buffer, lay.pos, max_tokens, np.int64)
        self.slot_mapping = _view(self.buffer, lay.slots, max_tokens, np.int64)
        self.seq_lens = _view(self.buffer, lay.seq_lens, max_seqs, np.int32)
        self.query_start_loc = _view(self.buffer, lay.qsl, max_seqs + 1, np.int32)
        self.tiles = _view(self.buffer, lay.tiles, lay.num_tiles, np.int32)
        self.slot_mapping.fill_(-1)   # until a step loads them: no token writes the cache, no tile runs
        self.tiles.fill_(-1)
        self._metadata: dict[int, AttentionMetadata] = {}

    def tiles_for(self, num_tokens: int) -> int:
        """Work-list entries of the graph of ``num_tokens`` tokens: enough for any mix of sequences."""
        return -(-num_tokens // self.tile_tokens) + self.max_seqs

    def metadata(self, num_tokens: int) -> AttentionMetadata:
        """Metadata of the graph of ``num_tokens`` tokens. Its host lists are placeholders (one entry per
        sequence slot): the backend reads the device tensors and the work list only. Built once per bucket."""
        meta = self._metadata.get(num_tokens)
        if meta is None:
            meta = self._metadata[num_tokens] = self._build_metadata(num_tokens)
        return meta

    def _build_metadata(self, num_tokens: int) -> AttentionMetadata:
        s = self.max_seqs
        return AttentionMetadata(
            query_lens=[0] * s, seq_lens=[0] * s, query_start_loc=self.query_start_loc,
            seq_lens_tensor=self.seq_lens, block_tables=self.block_tables,
            slot_mapping=self.slot_mapping[:num_tokens], block_size=self.block_size,
            extend_tiles=self.tiles[:self.tiles_for(num_tokens)])

    def load(self, staged: torch.Tensor, num_seqs: int, width: int) -> None:
        """staged: the host bytes [fixed header | compact tables [num_seqs, width]] built by StepInputs."""
        self.buffer[:staged.numel()].copy_(staged, non_blocking=True)
        lay = self.layout
        compact = _view(self.buffer, lay.tables, num_seqs * width, np.int32).view(num_seqs, width)
        self.block_tables[:num_seqs, :width].copy_(compact)

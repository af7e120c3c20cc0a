"""Turns a ``SchedulerOutput`` into one forward pass and one sampling call.

Owns the model, the KV tensors, the attention backend and the sampler; knows nothing of requests
beyond the per-row sampling settings the engine hands it.

Per step on the GPU: the inputs are built with numpy in one pinned buffer and sent with one H2D copy
(``engine.step_inputs``); a step whose every item is a 1-token decode that samples replays a CUDA graph
(``engine.cuda_graphs``) when one holds the batch, a step with prefill chunks replays the mixed-step graph of
its token bucket (``engine.mixed_graphs``), anything else runs eagerly; logits are computed for the
sampled rows only; an all-greedy batch is sampled with argmax + logsumexp and read back with one host sync;
on CUDA other batches go through the sort-free sampling kernel (``engine.sampling_triton``).
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

from engine.attention import AttentionBackend, build_metadata
from engine.kv_cache import kv_storage
from engine.kv_offload import HostKVCache
from engine.model_config import ModelConfig
from engine.sampling import Sampler, SamplingRow, upload_nonblocking
from engine.step_inputs import StepInputs
from scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None


class ModelRunner:
    # batch-invariant mode: the model's ops (engine.models.invariant_ops), whose per-row logprob every step returns
    invariant_ops = None
    # MoE models: the per-slot routed experts (engine.routing), moved with the KV blocks; set by the engine
    routing = None

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], backend: AttentionBackend,
                 block_size: int, device: torch.device, sampler: Sampler,
                 host_cache: HostKVCache | None = None, *,
                 enable_cuda_graphs: bool = True, cuda_graph_max_batch: int = 256,
                 max_model_len: int | None = None, decode_gemv: str = "auto",
                 cuda_graph_max_tokens: int = 0, max_num_seqs: int = 256) -> None:
        """enable_cuda_graphs: capture decode graphs now (CUDA + the Triton backend only);
        cuda_graph_max_batch: the largest captured batch (the largest size of 1, 2, 4 .. 256 up to it);
        max_model_len: the longest sequence a graph must hold (block-table width), default the model's
        max_position_embeddings; cuda_graph_max_tokens: the largest step with prefill chunks that replays
        a mixed-step graph (0: such steps run eagerly), of at most ``max_num_seqs`` sequences; decode_gemv: matrix-vector kernels for decode batches of 1-4 rows, "auto"
        (measured at capture), "on" or "off" (``engine.cuda_graphs``)."""
        self.model = model
        self.invariant_ops = getattr(model, "invariant_ops", None)
        self.model_config = model_config
        self.set_kv_caches(kv_caches)
        self.backend = backend
        self.block_size = block_size
        self.device = torch.device(device)
        self.sampler = sampler
        self.host_cache = host_cache
        self.inputs = StepInputs(block_size, self.device)
        self.graphs = None
        self.mixed_graphs = None
        self.graph_captures = 0   # times the graphs were captured (a wake that keeps them captures none)
        self._pool_bytes: tuple | None = None   # (graph_pool_bytes,) of the current capture, once measured
        # Replay captured graphs when set (tests and benchmarks flip it to compare with eager).
        self.use_cuda_graphs = True
        self.step_counts = {"graph": 0, "mixed graph": 0, "eager": 0}  # steps by path (benchmarks read it)
        self.decode_gemv = decode_gemv
        # Greedy rows sampled by two Triton kernels on CUDA (None: torch ops); models whose compute_logits
        # takes ``upcast`` hand them the lm_head's dtype.
        self._greedy_kernel = None
        # Batches with sampled rows on CUDA: the sort-free kernel (None: ``sampler``, the torch reference;
        # benchmarks set it to None to compare)
        self.kernel_sampler = None
        if self.device.type == "cuda":
            from engine.models.decoder import fused_kernels
            kernels = fused_kernels()
            self._greedy_kernel = kernels.greedy_sample if kernels is not None else None
            if kernels is not None:
                from engine.sampling_triton import TritonSampler
                self.kernel_sampler = TritonSampler(sampler.seed)
        self._raw_logits = "upcast" in inspect.signature(model.compute_logits).parameters
        if decode_gemv == "on" and self.device.type == "cuda" and hasattr(model, "set_gemv_rows"):
            from engine.kernels.gemv import MAX_ROWS
            model.set_gemv_rows(MAX_ROWS)  # eager forwards too, with or without graphs
        self._graph_args = None
        self._gemv_choices: dict[int, bool] | None = None   # the first capture's, reused by re-captures
        warmed = False
        if enable_cuda_graphs and self.device.type == "cuda" and getattr(model_config, "is_moe", False):
            # the fused MoE path (engine.kernels.moe) reads nothing on the host, so graphs capture it; the torch
            # path it falls back to when a kernel fails reads the expert counts on the host and cannot be captured.
            # So the eager warm-up runs first (the kernels compile and run once), and graphs stay off if any layer
            # fell back
            self._warm_up_eager()
            warmed = True
            moes = [m for m in (getattr(layer, "moe", None) for layer in getattr(model, "layers", ())) if m is not None]
            if fused_kernels() is None or any(m.use_fused is False for m in moes):
                logger.warning("mixture-of-experts model: the fused MoE kernels are unavailable or failed; CUDA "
                               "graphs off (the torch MoE path reads expert counts on the host)")
                enable_cuda_graphs = False
            else:
                logger.info("mixture-of-experts model: the fused MoE path runs inside the CUDA graphs")
        if enable_cuda_graphs and self.device.type == "cuda" and backend.name == "triton":
            self._graph_args = (cuda_graph_max_batch, max_model_len or model_config.max_position_embeddings,
                                cuda_graph_max_tokens, max_num_seqs)
            try:
                self.capture_cuda_graphs(*self._graph_args)
            except Exception as e:  # noqa: BLE001 - see below
                if not warmed:
                    raise
                # a MoE kernel that failed only at a captured shape fell back to the host-reading torch path
                # inside the capture: serve eagerly rather than not at all
                logger.warning("mixture-of-experts model: CUDA graph capture failed (%s: %s); CUDA graphs off",
                               type(e).__name__, e)
                self.drop_cuda_graphs()
                self._graph_args = None
                torch.cuda.synchronize(self.device)
        if self.device.type == "cuda" and not warmed:
            self._warm_up_eager()

    @torch.inference_mode()
    def _warm_up_eager(self) -> None:
        """JIT-compile the eager path's kernels (prefill chunks, mixed batches, eager decode) now, at
        load, instead of inside the first requests' steps. It writes KV into the first few blocks,
        which no sequence holds yet."""
        num_blocks = self.kv_caches[0][0].shape[0]
        for query_lens, seq_lens in (([20, 1], [20, 21]), ([1, 1], [5, 40])):
            tables = [[b % num_blocks for b in range(-(-s // self.block_size))] for s in seq_lens]
            meta = build_metadata(query_lens, seq_lens, tables, self.block_size, self.device)
            n = sum(query_lens)
            ids = torch.zeros(n, dtype=torch.long, device=self.device)
            pos = torch.cat([torch.arange(s - q, s) for q, s in zip(query_lens, seq_lens)]).to(self.device)
            hidden = self.model(ids, pos, self.kv_caches, meta, self.backend)
            self.model.compute_logits(hidden[-1:])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def set_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        """The KV tensors every step reads (None while the engine sleeps)."""
        self.kv_caches = kv_caches
        self.kv_storage = kv_storage(kv_caches) if kv_caches is not None else None

    def recapture_cuda_graphs(self) -> bool:
        """Capture the graphs again (new KV or weight addresses after a sleep without fixed-address memory);
        -> whether graphs are used."""
        if self._graph_args is None:
            return False
        self.capture_cuda_graphs(*self._graph_args, known_gemv=self._gemv_choices)
        return True

    def drop_cuda_graphs(self) -> None:
        """Let the graphs and their memory pools go (a sleep that reallocates what they read; re-captured at
        wake)."""
        self.graphs = self.mixed_graphs = None
        self._pool_bytes = None

    def graph_pool_bytes(self) -> int | None:
        """Device bytes the graphs' memory pools hold (0 without graphs; None where torch's memory snapshot
        does not tell the pools apart). Measured once per capture: replays allocate nothing."""
        pools = {g.pool for g in (self.graphs, self.mixed_graphs) if g is not None and g.pool is not None}
        if not pools:
            return 0
        if self._pool_bytes is None:
            try:
                sizes = [seg["total_size"] for seg in torch.cuda.memory_snapshot()
                         if tuple(seg["segment_pool_id"]) in pools]
            except (KeyError, TypeError, RuntimeError):
                sizes = []
            self._pool_bytes = (sum(sizes) if sizes else None,)   # no segment of the pools: unmeasured
        return self._pool_bytes[0]

    def capture_cuda_graphs(self, max_batch: int, max_model_len: int, max_tokens: int = 0, max_seqs: int = 256,
                            known_gemv: dict[int, bool] | None = None) -> None:
        """Decode graphs up to ``max_batch`` rows, and mixed-step graphs up to ``max_tokens`` tokens of
        ``max_seqs`` sequences (none when 0). ``known_gemv``: an earlier capture's matrix-vector choices
        (``DecodeGraphs``), reused by a re-capture."""
        from engine.attention.triton_backend import TritonBackend
        from engine.cuda_graphs import DecodeGraphs, decode_splits
        from engine.kernels.attention import _num_sms
        from engine.kernels.extend_attention import extend_tile_tokens
        from engine.kernels.gemv import MAX_ROWS
        from engine.mixed_graphs import MIN_TOKENS, MixedGraphs

        sms = _num_sms(self.device.index if self.device.index is not None else torch.cuda.current_device())
        mc = self.model_config
        hkv = mc.num_kv_heads
        recapture = known_gemv is not None
        self.drop_cuda_graphs()  # release the old pools first
        max_blocks = -(-max_model_len // self.block_size)
        with torch.inference_mode():
            if max_tokens >= MIN_TOKENS:
                self.mixed_graphs = MixedGraphs(
                    self.model, self.kv_caches,
                    TritonBackend(extend_max_splits=getattr(self.backend, "extend_max_splits", 1)),
                    self.block_size, max_blocks, max_tokens,
                    max_seqs, extend_tile_tokens(mc.num_heads, hkv, mc.head_dim), self.device, recapture=recapture)
            self.graphs = DecodeGraphs(
                self.model, self.kv_caches, lambda bs: TritonBackend(decode_num_splits=decode_splits(bs, hkv, sms)),
                self.block_size, max_blocks, max_batch, self.device,
                decode_gemv=self.decode_gemv, gemv_max_rows=MAX_ROWS if hasattr(self.model, "set_gemv_rows") else 0,
                known_gemv=known_gemv)
        self._gemv_choices = dict(self.graphs.gemv)
        self.graph_captures += 1

    def _graph_batch(self, items) -> int | None:
        if self.graphs is None or not self.use_cuda_graphs:
            return None
        if not all(it.num_tokens == 1 and it.sample for it in items):
            return None
        return self.graphs.padded_batch(len(items))

    def _mixed_bucket(self, items, num_tokens: int) -> int | None:
        if self.mixed_graphs is None or not self.use_cuda_graphs:
            return None
        return self.mixed_graphs.bucket(num_tokens, len(items))

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, rows: dict[int, SamplingRow]) -> dict[int, SampledToken]:
        """Run the step; ``rows`` holds the sampling settings of every item with ``sample=True``
        (keyed by seq_id). Returns seq_id -> sampled token."""
        return self.launch(output, rows).read()

    @torch.inference_mode()
    def launch(self, output: SchedulerOutput, rows: dict[int, SamplingRow],
               prev: "PendingStep | None" = None) -> "PendingStep":
        """Queue the step on the device and return before its results are read (``PendingStep.read``).

        ``prev``: for a decode step scheduled ahead (``Scheduler.schedule_decode_ahead``), the pending step whose
        sampled tokens are this step's inputs: its items carry placeholder ids, and the real ids are copied on
        the device from ``prev``'s sampled-token tensor, so nothing waits for ``prev`` to finish."""
        if self.routing is not None:   # its rows move with the blocks, reads before writes as below
            self.routing.offload(output.swap_out)
            self.routing.copy_blocks(output.block_copies)
            self.routing.restore(output.swap_in)
        if output.swap_out or output.swap_in:
            # reads before writes (the scheduler's copy contract): gather what leaves, then copy
            assert self.host_cache is not None, "the scheduler offloaded KV without a host pool"
            gathered = self.host_cache.gather(output.swap_out)
            if output.block_copies:
                self._copy_blocks(output.block_copies)
            self.host_cache.copy(gathered, output.swap_in, output.restores)
        elif output.block_copies:
            self._copy_blocks(output.block_copies)
        items = output.scheduled
        if not items:
            return PendingStep(items, [], [])
        batch = self._graph_batch(items)
        if batch is not None:
            self.inputs.prepare_graph_decode(items, self.graphs.inputs, batch)
            if prev is not None:
                self._feed_tokens(prev, items[:output.num_fed], self.graphs.inputs.input_ids)
            hidden = self.graphs.replay(batch)[:len(items)]   # [n, hidden]: every item samples
            sample_items = list(range(len(items)))
            self.step_counts["graph"] += 1
        else:
            bucket = self._mixed_bucket(items, output.num_batched_tokens)
            if bucket is not None:
                self.step_counts["mixed graph"] += 1
                step = self.inputs.prepare_graph_mixed(items, output.num_batched_tokens, self.mixed_graphs.inputs,
                                                       bucket)
            else:
                self.step_counts["eager"] += 1
                step = self.inputs.prepare(items, output.num_batched_tokens)
            if prev is not None:   # the fed items come first, one token each: input_ids[:num_fed]
                self._feed_tokens(prev, items[:output.num_fed], step.input_ids)
            if bucket is not None:
                hidden = self.mixed_graphs.replay(bucket)                                        # [bucket, hidden]
            else:
                hidden = self.model(step.input_ids, step.positions, self.kv_caches, step.meta, self.backend)  # [T, hidden]
            sample_items = step.sample_items
            if not sample_items:
                return PendingStep(items, [], [])
            hidden = hidden[step.sample_rows]  # the last token of each sampling item
        sample_rows = [rows[items[i].seq_id] for i in sample_items]
        forks = []
        if len(rows) > len(sample_items):   # the engine added rows for n > 1 siblings (rare: scan only then)
            forks = [(j, i, seq_id) for j, i in enumerate(sample_items) for seq_id, _ in items[i].fork_samples]
        if forks:
            # n > 1 siblings sample their first token from their leader's row: repeat it
            idx = list(range(len(sample_items))) + [j for j, _, _ in forks]
            hidden = hidden.index_select(0, upload_nonblocking(idx, torch.int64, self.device))
            sample_rows += [rows[seq_id] for _, _, seq_id in forks]
        greedy = all(r.is_greedy and r.num_logprobs is None for r in sample_rows)
        if self._greedy_kernel is not None if greedy else self.kernel_sampler is not None:
            # the kernels read the lm_head's own dtype: no float32 copy of the logits
            logits = self.model.compute_logits(hidden, upcast=False) if self._raw_logits \
                else self.model.compute_logits(hidden)                  # [R, vocab]
        else:
            logits = self.model.compute_logits(hidden)  # [R, vocab] float32
        return self._sample(logits, items, sample_items, sample_rows, greedy,
                            [(i, seq_id) for _, i, seq_id in forks])

    def _feed_tokens(self, prev: "PendingStep", items, input_ids: torch.Tensor) -> None:
        """input_ids[j] = the token ``prev`` sampled for items[j]'s sequence, on the device (``items``: the fed
        items of a step planned ahead, ``SchedulerOutput.num_fed``).

        They list ``prev``'s sampling sequences in ``prev``'s order, minus those that ended: with as many items
        as ``prev`` has sample rows, row j feeds item j (the common case, one slice copy)."""
        assert prev.token_ids is not None, "a step scheduled ahead needs a previous step sampled on the device"
        n = len(items)
        if n == 0:
            return
        assert len(prev.row_seq_ids) == len(prev.sample_items), "a step with forked siblings is never chained"
        if n == len(prev.sample_items):
            input_ids[:n].copy_(prev.token_ids[:n])
            return
        row_of = {prev.items[i].seq_id: r for r, i in enumerate(prev.sample_items)}
        idx = upload_nonblocking([row_of[it.seq_id] for it in items], torch.int64, self.device)
        input_ids[:n].copy_(prev.token_ids.index_select(0, idx))

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Device block src -> dst in every layer's K and V cache (a forked sibling's partial last block)."""
        src = upload_nonblocking([s for s, _ in copies], torch.int64, self.device)
        dst = upload_nonblocking([d for _, d in copies], torch.int64, self.device)
        if self.kv_storage is not None:           # [2L, num_blocks, block_size, Hkv, D]: every layer at once
            self.kv_storage.index_copy_(1, dst, self.kv_storage.index_select(1, src))
            return
        for k_cache, v_cache in self.kv_caches:   # [num_blocks, block_size, Hkv, D]
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))

    def _sample_rows(self, logits: torch.Tensor, rows: list[SamplingRow]):
        """The sort-free kernel on CUDA; the first time it fails (it would not build under this Triton, say) the
        reference sampler from then on, with a WARNING: a sampled batch is never lost to it."""
        if self.kernel_sampler is not None:
            try:
                return self.kernel_sampler.sample(logits, rows)
            except Exception as e:  # noqa: BLE001 - a compile or launch failure of the kernel
                logger.warning("the sampling kernel failed (%s: %s); sampling with the torch reference from now "
                               "on", type(e).__name__, e)
                self.kernel_sampler = None
        return self.sampler.sample(logits.float(), rows)

    def _sample(self, logits: torch.Tensor, items, sample_items: list[int],
                rows: list[SamplingRow], greedy: bool,
                forks: list[tuple[int, int]] = ()) -> "PendingStep":
        """Sample every row on the device and queue one non-blocking copy of the results to pinned host
        memory, read later (``PendingStep.read_rows``): no host sync here. All-greedy rows without top
        logprobs (``greedy``): argmax and logsumexp, in two Triton kernels on CUDA
        (``engine.kernels.greedy``), else the same torch ops as ``Sampler`` at T = 1; other rows:
        ``kernel_sampler.sample`` on CUDA, else ``Sampler.sample``. ``forks``: (leader item index, sibling seq_id) of the rows after the items' own."""
        sample = None
        if greedy and self._greedy_kernel is not None:
            tokens, pair = self._greedy_kernel(logits)                             # [R], [2, R] float64
            device_side = [pair]
        else:
            if greedy:
                tokens = logits.argmax(dim=-1)                                     # [R]
                lp = logits.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
            else:
                sample = self._sample_rows(logits, rows)
                tokens, lp = sample.token_ids, sample.logprobs
            # ids < 2**24 are exact in float64, as are fp32 logprobs: one [2, R] copy carries both (the
            # kernel sampler writes that pair itself)
            packed = getattr(sample, "packed", None)
            device_side = [packed if packed is not None else
                           torch.stack((tokens.to(torch.float64), lp.to(torch.float64)))]
        ops = self.invariant_ops
        if ops is not None:
            # batch-invariant mode: the logprob is the mode's own per-row kernel (what a trainer's forward
            # computes: engine.models.invariant_policy), whichever path chose the token
            temps = upload_nonblocking([1.0 if r.is_greedy else r.temperature for r in rows], torch.float32,
                                       self.device)
            lp = ops.logprobs(logits, tokens, temps)                               # [R] float32
            device_side[0] = torch.stack((tokens.to(torch.float64), lp.to(torch.float64)))
        if sample is not None and sample.asked:
            device_side += [sample.top_vals, sample.top_ids]
        event = None
        if self.device.type == "cuda":
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in device_side]
            for h, t in zip(host, device_side):
                h.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            device_side = host
        return PendingStep(items, sample_items, rows, token_ids=tokens, host=device_side, event=event,
                           sample=sample, forks=forks)


class PendingStep:
    """A step queued on the device; ``read_rows`` / ``read`` wait for it and return its samples."""

    def __init__(self, items, sample_items: list[int], rows: list[SamplingRow], *,
                 token_ids: torch.Tensor | None = None, host: list[torch.Tensor] | None = None,
                 event=None, sample=None, forks=()) -> None:
        self.items = items
        self.sample_items = sample_items   # items sampled, one row each (the first len(sample_items) rows)
        self.rows = rows
        # every sample row: the item it belongs to (index) and the sequence it samples for; rows past the
        # items' own are n > 1 siblings sampled from their leader's row
        self.row_items = sample_items
        self.row_seq_ids = [items[i].seq_id for i in sample_items]
        if forks:
            self.row_items = list(sample_items) + [i for i, _ in forks]
            self.row_seq_ids += [seq_id for _, seq_id in forks]
        self.token_ids = token_ids   # [R] int64 on the device: the inputs of a decode step scheduled ahead
        self._host = host            # [[2, R] float64 ids + logprobs, (top vals, top ids)] (pinned on CUDA)
        self._event = event          # recorded after the device->host copies
        self._sample = sample        # engine.sampling.DeviceSample (sampler path), for the top logprobs

    @property
    def on_device(self) -> bool:
        """Sampled tokens stay on the device until ``read``: a decode step can be chained after this one."""
        return self.token_ids is not None

    def read_rows(self) -> tuple[list[int], list[float], list | None]:
        """Wait for the step -> (token ids, logprobs, top logprobs or None), one entry per sample row (the
        order of ``row_seq_ids``)."""
        if self._host is None:
            return [], [], None
        if self._event is not None:
            self._event.synchronize()
        both = self._host[0].tolist()
        tops = None
        if self._sample is not None:
            extra = [t.tolist() for t in self._host[1:]] or [None, None]
            tops = self._sample.host_tops(*extra)
        return [int(t) for t in both[0]], both[1], tops

    def read(self) -> dict[int, SampledToken]:
        """``read_rows`` keyed by seq_id, as SampledToken."""
        token_ids, logprobs, tops = self.read_rows()
        rows = self.rows
        return {
            seq_id: SampledToken(token_ids[r], logprobs[r],
                                 tops[r] if tops is not None and rows[r].num_logprobs is not None else None)
            for r, seq_id in enumerate(self.row_seq_ids)
        }

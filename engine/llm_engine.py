"""``LLMEngine``: the facade over scheduler + model runner for one model on one device.

Step API: ``add_request`` queues token ids, ``step`` runs one scheduler step (one forward pass)
and returns the samples that finished in it, ``abort`` ends a request now, ``has_unfinished``
says whether anything is queued or running. ``generate`` is the blocking convenience on top.

Sessions: ``open_session`` / ``submit_turn`` (or the blocking ``run_turn``) / ``close_session``.
A session's KV survives between turns (offloaded to a host pool under pressure), so a turn
computes only its new tokens.
"""
from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch

from engine.attention import choose_backend, get_backend
from engine.config import EngineConfig
from engine.device_memory import FixedAddresses
from engine.kv_cache import allocate_kv_cache, kv_bytes_per_block, kv_cache_shape
from engine.kv_offload import HostKVCache
from engine.memory import device_kv_blocks, host_kv_bytes
from engine.model_runner import ModelRunner, PendingStep
from engine.models.invariant_ops import invariant_ops_for
from engine.engine_stats import engine_stats
from engine.output_processor import OutputProcessor
from engine.request_validation import validate_input
from engine.engine_update import apply_update
from engine.sleep import EngineAsleep, SleepReport, WakeReport, sleep as sleep_engine, wake_up as wake_engine
from engine.outputs import Completion, PartialOutput
from engine.routing import RoutedExpertStore
from engine.sampling import Sampler, SamplingParams
from engine.stop_strings import stop_string_tokenizer
from engine.weight_update import UpdateReport, WeightUpdater
from engine.weights import load_model
from scheduler import FinishedSequence, FinishReason, Scheduler, SchedulerConfig, StopCondition

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct")


class WeightsInconsistentState(RuntimeError):
    """The engine refuses work: an update failed after writes it could not undo; only a
    complete update brings it back."""


def resolve_model_path(model: str) -> Path:
    """A model directory, or the offline SmolLM2-135M-Instruct by alias (converted once, cached)."""
    if model.lower() in _SMOLLM2_ALIASES:
        from engine.smollm2 import ensure_smollm2
        return ensure_smollm2()
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model: path {str(path)!r} does not exist")
    return path


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        if not isinstance(config, EngineConfig):
            raise TypeError(f"LLMEngine expects an EngineConfig, got {type(config).__name__}")
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but CUDA is not available")
        self.dtype = _TORCH_DTYPES[config.dtype]
        self.model_path = resolve_model_path(config.model)
        # CUDA: weights, fp32 head copies and KV in regions at fixed addresses (sleep keeps the CUDA graphs);
        # None: torch allocations (CPU, switched off, or the driver API unavailable: logged)
        self.fixed_memory = FixedAddresses.open(self.device) if config.fixed_address_memory else None
        fixed = self.fixed_memory
        self.model, self.model_config = load_model(
            self.model_path, self.dtype, self.device, random_weights=config.load_format == "dummy",
            materialize=(lambda m: fixed.materialize("weights", m)) if fixed is not None else None)
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.kv_block_bytes = kv_bytes_per_block(mc, config.block_size, self.dtype)
        self.updater = WeightUpdater(self.model, mc)   # the only writer of the parameters from here on
        num_blocks = config.num_kv_blocks or device_kv_blocks(
            config, mc, self.kv_block_bytes, self.max_model_len, self.device, self.updater.param_bytes,
            region_granularity=fixed.granularity if fixed is not None else 0)
        if config.fp32_head_in_effect:   # after the KV sizing, which reserves the copies' bytes by name
            self.model.enable_fp32_head(
                (lambda m: fixed.materialize("fp32 head", m, buffers=True)) if fixed is not None else None)
        elif config.fp32_lm_head:
            logger.debug("fp32_lm_head: no-op for a float32 model (its norm and lm_head already run in float32)")
        if config.batch_invariant and mc.is_moe:
            raise ValueError("EngineConfig.batch_invariant: mixture-of-experts models are not supported in the "
                             "batch-invariant mode")
        if config.batch_invariant:   # before the runner: its graphs capture the invariant forward
            self.model.invariant_ops = invariant_ops_for(self.device)
            logger.info("batch-invariant mode: %s ops (engine.models.invariant_ops)", self.model.invariant_ops.name)
        backend_name = choose_backend(config.attention_backend, self.device)
        self.backend = get_backend(backend_name)
        if hasattr(self.backend, "extend_max_splits"):   # the Triton backend's split-KV extend
            self.backend.extend_max_splits = config.extend_kv_splits
        logger.info("engine: %s (%s) on %s %s, attention backend %r, %d KV blocks of %d tokens",
                    mc.architecture, self.model_path.name, self.device, config.dtype, backend_name,
                    num_blocks, config.block_size)
        storage = fixed.empty("kv", kv_cache_shape(mc, num_blocks, config.block_size), self.dtype) \
            if fixed is not None else None
        self.kv_caches = allocate_kv_cache(mc, num_blocks, config.block_size, self.dtype, self.device, storage)
        del storage
        num_host_blocks = host_kv_bytes(config, self.device, num_blocks * self.kv_block_bytes) // self.kv_block_bytes
        host_cache = HostKVCache(self.kv_caches, num_host_blocks) if num_host_blocks else None
        self.host_cache = host_cache
        # MoE models: each context slot's routed experts, written by the MoE layers (engine.routing)
        self.routing: Optional[RoutedExpertStore] = None
        if mc.is_moe:
            self.routing = RoutedExpertStore(num_blocks, config.block_size, len(mc.moe_layers),
                                             mc.num_experts_per_tok, mc.num_experts, self.device, num_host_blocks)
            for j, i in enumerate(mc.moe_layers):
                self.model.layers[i].moe.routing_sink = self.routing.writer(j)
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=num_blocks, block_size=config.block_size, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=self.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching, num_host_blocks=num_host_blocks,
            default_session_ttl_s=float(config.session_ttl_s), preemption=config.preemption,
            expected_output_tokens=config.expected_output_tokens, retain_sessions=config.retain_sessions,
            plan_ahead_after_prefill=config.async_after_prefill, plan_ahead_admissions=config.async_admissions))
        self.runner = ModelRunner(self.model, mc, self.kv_caches, self.backend, config.block_size,
                                  self.device, Sampler(config.seed), host_cache,
                                  enable_cuda_graphs=config.enable_cuda_graphs,
                                  cuda_graph_max_batch=min(config.cuda_graph_max_batch, config.max_num_seqs),
                                  max_model_len=self.max_model_len,
                                  # the invariant forward has no matrix-vector variant to measure
                                  decode_gemv="off" if config.batch_invariant else config.decode_gemv,
                                  cuda_graph_max_tokens=config.mixed_graph_tokens, max_num_seqs=config.max_num_seqs)
        self.runner.routing = self.routing
        self.outputs = OutputProcessor()
        self._unclaimed: list[Completion] = []
        self._request_counter = itertools.count()
        self._tokenizer = None
        self._tokenizer_error: Optional[str] = None   # why the model's tokenizer could not be loaded
        # A step queued on the device ahead of the one being read (async scheduling): (output, step, version).
        self._pending: Optional[tuple] = None
        self.asleep = 0                       # the sleep level while asleep (engine.sleep), else 0
        self.weights_discarded = False        # woken from sleep(2): undefined until a complete update lands
        self._released = None                 # what sleep took away, for wake_up (engine.sleep)

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def weight_version(self) -> int:
        return self.scheduler.weight_version

    @property
    def tokenizer(self):
        """The model directory's tokenizer (transformers), loaded on first use."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        return self._tokenizer

    # ------------------------------------------------------------------ requests
    def _validate(self, prompt_token_ids: object, params: object, allow_empty: bool = False,
                  field: str = "prompt_token_ids") -> tuple[list[int], SamplingParams]:
        if self.updater.inconsistent:
            raise WeightsInconsistentState("the engine's weights are inconsistent after a failed update; "
                                           "it refuses work until a complete update_weights succeeds")
        if self.weights_discarded:
            raise WeightsInconsistentState("the engine's weights were released by sleep(level=2); it refuses work "
                                           "until a complete update_weights lands")
        tokens, params = validate_input(prompt_token_ids, params, self.vocab_size, self.max_model_len, allow_empty,
                                        field)
        if params.stop:
            stop_string_tokenizer(self)     # no tokenizer: refused now, not at the first step
        if params.return_routed_experts and self.routing is None:
            raise ValueError(f"SamplingParams.return_routed_experts: {self.model_config.architecture} has no "
                             f"mixture-of-experts layers")
        return tokens, params

    def add_request(self, prompt_token_ids: Sequence[int], params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        """Queue one prompt; returns its request id. Bad input raises (ValueError naming the
        field) and leaves the engine's state unchanged."""
        tokens, params = self._validate(prompt_token_ids, params)
        return self._add_validated(tokens, params, request_id)

    def _add_validated(self, tokens: list[int], params: SamplingParams, request_id: Optional[str]) -> str:
        if request_id is None:
            request_id = f"req-{next(self._request_counter)}"
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty str, got {request_id!r}")
        seq_ids = self.scheduler.add_request(request_id, tokens, self._stop(params), n=params.n)
        self.outputs.add(request_id, params, seq_ids, self._tokenizer, tokens)
        return request_id

    def _stop(self, params: SamplingParams) -> StopCondition:
        return StopCondition(max_tokens=params.max_tokens, stop_token_ids=frozenset(params.stop_token_ids),
                             eos_token_ids=frozenset(self.model_config.eos_token_ids), ignore_eos=params.ignore_eos)

    # ------------------------------------------------------------------ sessions
    def open_session(self, session_id: Optional[str] = None, ttl_s: Optional[float] = None,
                     priority: int = 0) -> str:
        """Open a multi-turn session (no tokens yet); returns its id. ``ttl_s``: an idle session
        older than this is closed and its KV freed (default ``EngineConfig.session_ttl_s``)."""
        if session_id is None:
            session_id = f"session-{uuid.uuid4().hex[:12]}"
        self.scheduler.open_session(session_id, ttl_s=ttl_s, priority=priority)
        return session_id

    def submit_turn(self, session_id: str, new_token_ids: Sequence[int], params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        """Append ``new_token_ids`` (a user message or an environment observation: not model
        tokens) to the session and queue the model's turn; returns the turn's request id. Its
        Completion comes from ``step`` like any request's. Raises (ValueError / SessionError)
        without changing the session on bad input, an unknown or closed session, or a turn
        already in progress."""
        tokens, params = self._validate(new_token_ids, params, allow_empty=True, field="new_token_ids")
        if params.n != 1:
            raise ValueError(f"SamplingParams.n must be 1 for a session turn, got {params.n} "
                             "(open one session per sample instead)")
        if request_id is None:
            request_id = f"turn-{next(self._request_counter)}"
        seq_id = self.scheduler.submit_turn(session_id, request_id, tokens, self._stop(params))
        context = self.scheduler.get_session(session_id).token_ids if params.stop else ()
        self.outputs.add(request_id, params, [seq_id], self._tokenizer, context)
        return request_id

    def run_turn(self, session_id: str, new_token_ids: Sequence[int],
                 params: Optional[SamplingParams] = None) -> Completion:
        """Blocking ``submit_turn``: steps the engine until this turn finishes (other requests
        progress too; their completions are returned by the next ``step``)."""
        self._require_awake("run_turn")
        request_id = self.submit_turn(session_id, new_token_ids, params)
        while True:
            for c in self.step():
                if c.request_id == request_id:
                    return c
                self._unclaimed.append(c)

    def close_session(self, session_id: str) -> list[Completion]:
        """Free everything the session holds; a turn in progress comes back aborted."""
        return self._completions(self.scheduler.close_session(session_id))

    def session_tokens(self, session_id: str) -> list[int]:
        """The session's whole history (prompts, observations and model tokens)."""
        return list(self.scheduler.get_session(session_id).token_ids)

    def abort(self, request_id: str) -> list[Completion]:
        """End a request now; its samples come back with finish_reason "aborted" and the tokens
        generated so far (a step queued ahead for it is dropped when read). Unknown or finished ids return []."""
        return self._completions(self.scheduler.abort(request_id))

    def output_length(self, request_id: str, sample_index: int = 0) -> int:
        """Tokens a running request (or turn) has generated so far, as recorded from the steps read; 0 when
        it is unknown or finished (progress for callers that stop work on their own criteria)."""
        seqs = self.scheduler.request_sequences(request_id) if self.scheduler.has_request(request_id) else ()
        seq = next((s for s in seqs if s.sample_index == sample_index), None)
        return self.outputs.num_recorded(seq.seq_id) if seq is not None else 0

    def partial_outputs(self, request_id: str, offsets: dict[int, int]) -> list[PartialOutput]:
        """Each running sample of a request: its tokens past ``offsets[sample_index]`` (0 when absent), as
        recorded from the steps read; [] when the request is unknown or finished (its Completions carry all)."""
        if not self.scheduler.has_request(request_id):
            return []
        return [self.outputs.partial(s, offsets.get(s.sample_index, 0))
                for s in self.scheduler.request_sequences(request_id) if s.request_id == request_id]

    def has_unfinished(self) -> bool:
        """Whether ``step`` has work to do (False while asleep: queued work waits for ``wake_up``)."""
        if self.asleep:
            return False
        self._settle_dead_pending()
        return self.scheduler.has_unfinished() or self._pending is not None

    def has_completions(self) -> bool:
        """Whether completions wait for the next ``step`` to hand them out (e.g. of a step drained by an update)."""
        return bool(self._unclaimed)

    def _settle_dead_pending(self) -> None:
        """A step queued ahead whose every sequence has ended since (stop token, abort) has nothing left to
        deliver: read it now rather than report unfinished work."""
        if self._pending is None:
            return
        if not any(map(self.scheduler.live_sequence, self._pending[0].scheduled)):
            self._drain_pending()

    def step(self) -> list[Completion]:
        """Run one step; return the samples that finished in it (plus any finished earlier that
        ``generate`` did not claim).

        Async scheduling (``EngineConfig.async_scheduling``): when the step just queued is a pure decode
        sampled on the device, the next decode step is scheduled and queued behind it before its tokens
        are read (``Scheduler.schedule_decode_ahead``), so the host prepares step N+1 and processes step N's
        results while the device runs; the queued step is the one the next ``step`` call reads."""
        done, self._unclaimed = self._unclaimed, []
        if self.asleep:
            return done
        self._poll_restores()
        if self._pending is None:
            output = self.scheduler.schedule()
            if output.is_empty and self.scheduler.offload.num_landing:
                # nothing can run until a restore lands: wait for the oldest copies, then schedule again
                self.scheduler.kv_landed(self.host_cache.wait())
                output = self.scheduler.schedule()
            if output.is_empty:
                return done
            self._pending = (output, self._launch(output), self.scheduler.weight_version)
        output, pending, version = self._pending
        self._pending = None
        if self.config.async_scheduling and pending.on_device:
            self._poll_restores()
            ahead = self.scheduler.schedule_decode_ahead(output)
            if ahead is not None:
                self._pending = (ahead, self._launch(ahead, pending), self.scheduler.weight_version)
        return done + self._finish_step(output, pending, version)

    def _poll_restores(self) -> None:
        """Tell the scheduler which restores' host -> device copies have landed (never blocks)."""
        if self.host_cache is not None and (self.scheduler.offload.num_landing or self.host_cache.copies_in_flight):
            landed = self.host_cache.poll()
            if landed:
                self.scheduler.kv_landed(landed)

    def _launch(self, output, prev: Optional[PendingStep] = None) -> PendingStep:
        return self.runner.launch(output, self.outputs.rows(output), prev)

    def _finish_step(self, output, pending: PendingStep, version: int) -> list[Completion]:
        """Read a queued step, record its tokens and advance the scheduler. A row whose sequence ended (stop
        token, abort, closed session) after the step was queued is dropped here and by ``Scheduler.update``."""
        sampled = self.outputs.record(pending, version, self.scheduler.live_sequence)
        finished = self.scheduler.update(output, sampled)
        if self.outputs.has_stop_strings:
            # After update, as an EOS in it would: a step queued ahead for a sequence stopped here is computed and
            # dropped when read (its row's sequence no longer runs under that request id).
            # NOTE: an n > 1 sibling stopped on its first token had its partial prompt block's copy queued by
            # update; the copy runs before the next forward, so a new owner of that freed block overwrites it.
            for seq in self.outputs.stopped_by_strings(self.scheduler.running):
                finished.append(self.scheduler.finish(seq, FinishReason.STOP))
        return self._completions(finished)

    def _drain_pending(self) -> None:
        """Read the step queued ahead, if any, so the scheduler's state is settled (its completions go to
        the next ``step``)."""
        if self._pending is not None:
            output, pending, version = self._pending
            self._pending = None
            self._unclaimed.extend(self._finish_step(output, pending, version))

    def _completions(self, finished: Sequence[FinishedSequence]) -> list[Completion]:
        """Completions of sequences that finished together (their params read first: the first completion of a
        request with no sample left drops them)."""
        params = {f.request_id: self.outputs.params(f.request_id) for f in finished}
        return [self._completion(f, params[f.request_id]) for f in finished]

    def _completion(self, f: FinishedSequence, params: Optional[SamplingParams]) -> Completion:
        c = self.outputs.completion(f, request_done=not self.scheduler.has_request(f.request_id))
        if params is not None and params.return_routed_experts and f.block_ids:
            # the context's positions whose forward ran: all but the last token's
            num_positions = len(f.prompt_token_ids) + len(f.output_token_ids) - 1
            c.routed_experts = self.routing.read(f.block_ids, num_positions)
        return c

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> list[Completion]:
        """Generate for every prompt; returns one Completion per sample, prompt-major (prompt i's
        n samples are consecutive, by sample_index). All inputs are validated before any is queued."""
        self._require_awake("generate")
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of token-id lists")
        if params is None or isinstance(params, SamplingParams):
            params_list = [params] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(f"params: got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        validated = []
        for i, (p, sp) in enumerate(zip(prompts, params_list)):
            try:
                validated.append(self._validate(p, sp))
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        ids = [self._add_validated(tokens, sp, None) for tokens, sp in validated]
        pending = {rid: {} for rid in ids}
        remaining = sum((sp or SamplingParams()).n for sp in params_list)
        try:
            while remaining:
                for c in self.step():
                    if c.request_id in pending:
                        pending[c.request_id][c.sample_index] = c
                        remaining -= 1
                    else:
                        self._unclaimed.append(c)
        finally:
            for rid in ids:  # an exception mid-way must not leave our requests holding KV
                self.scheduler.abort(rid)
            self._settle_dead_pending()
        return [pending[rid][i] for rid in ids for i in range(len(pending[rid]))]

    # ------------------------------------------------------------------ weights
    def update_weights(self, loader, version: Optional[int] = None, mode: str = "keep", kv: str = "keep", *,
                       partial: bool = False, check_finite: bool = False,
                       backup_budget_bytes: Optional[int] = None) -> UpdateReport:
        """Apply new weights from any checkpoint loader (``weight_sync``'s or your own: duck-typed),
        validated and all-or-nothing, in place, between two steps.

        ``version``: the new policy version (default: the loader's, else current + 1); must grow.
        ``mode``: in-flight work — "keep" continues under the new weights (per-token ``versions``
        show the switch); "drain" first finishes what is running (queued work waits); "abort" ends
        all queued and running requests now (finish_reason "aborted", partial tokens kept; their
        completions come from the next ``step``).
        ``kv``: "keep" keeps the KV computed under the old weights for in-flight sequences and
        parked sessions; "recompute" recomputes it under the new ones. Prefix-cache entries of
        another version are never reused either way.

        On failure the old weights (bitwise) and version keep serving and WeightUpdateError is
        raised; if a failure could not be undone (backup budget exceeded), in-flight work is
        aborted and the engine refuses new work until a complete update lands."""
        # The loader protocol: close() exactly once on every path (a distributed sender blocks until
        # its receiver has drained or closed). WeightUpdater.apply closes it; a rejection before
        # apply is reached closes it here.
        applying = [False]     # set once WeightUpdater.apply (which closes the loader) is reached
        try:
            return apply_update(self, loader, version, mode, kv, partial, check_finite, backup_budget_bytes, applying)
        finally:
            if not applying[0] and getattr(loader, "close", None) is not None:
                loader.close()

    def _require_awake(self, what: str) -> None:
        if self.asleep:
            raise EngineAsleep(f"{what}: the engine is asleep (sleep level {self.asleep}); call wake_up first")

    def drain_running(self) -> None:
        """Finish every running sequence (queued work waits; their completions come from the next ``step``)."""
        self._drain_pending()
        self.scheduler.admission_paused = True
        try:
            while self.scheduler.running:
                finished = self.step()   # NOTE: step() replaces self._unclaimed; extend after it
                self._unclaimed.extend(finished)
        finally:
            self.scheduler.admission_paused = False

    # ------------------------------------------------------------------ sleep
    def sleep(self, level: int = 1) -> SleepReport:
        """Release device memory while idle (a colocated trainer's turn): level 1 the KV cache, level 2 the
        weights too. Running sequences finish first; queued work waits; parked sessions' KV goes to the host
        pool where it fits (``engine.sleep`` says what happens to everything)."""
        return sleep_engine(self, level)

    def wake_up(self) -> WakeReport:
        """Take the memory back (KV cache zeroed; CUDA graphs kept where the memory is at fixed addresses,
        re-captured otherwise) and resume; after level 2 the weights must be updated before any work runs."""
        return wake_engine(self)

    def _abort_all(self) -> None:
        for request_id in self.scheduler.unfinished_request_ids():
            self._unclaimed.extend(self.abort(request_id))

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        """Counters and gauges (docs/scheduler.md, "Statistics")."""
        return engine_stats(self)

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

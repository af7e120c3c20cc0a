"""Output processing: per-request sampling settings, and per-sequence logprobs, policy versions, top
logprobs and stop-string detectors from admission to the ``Completion``. The only writer of that state;
``LLMEngine`` hands it the rows of each step it reads, the tokens each step appended (stop strings) and the
scheduler's finished sequences."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

from engine.outputs import Completion, PartialOutput
from engine.sampling import SamplingParams, SamplingRow
from engine.stop_strings import StopStringDetector
from scheduler import FinishedSequence, SchedulerOutput


class OutputProcessor:
    def __init__(self) -> None:
        self._params: dict[str, SamplingParams] = {}
        self._logprobs: dict[int, list[float]] = {}
        self._versions: dict[int, list[int]] = {}
        self._rows: dict[int, SamplingRow] = {}   # per sequence, for the current request/turn
        self._top_logprobs: dict[int, list[list[tuple[int, float]]]] = {}
        # per sequence of a request with stop strings: (its request id, its detector)
        self._stops: dict[int, tuple[str, StopStringDetector]] = {}

    def add(self, request_id: str, params: SamplingParams, seq_ids: Sequence[int], tokenizer=None,
            context: Sequence[int] = ()) -> None:
        """A request (or a session's turn) was queued with these sequences. ``tokenizer``: required when
        ``params.stop`` is set; ``context``: the tokens before the output (the prompt, or the session so far)."""
        self._params[request_id] = params
        for seq_id in seq_ids:
            self._logprobs[seq_id] = []
            self._versions[seq_id] = []
            if params.logprobs is not None:
                self._top_logprobs[seq_id] = []
            if params.stop:
                detector = StopStringDetector(tokenizer, params.stop, params.include_stop_str_in_output, context)
                self._stops[seq_id] = (request_id, detector)

    @property
    def has_stop_strings(self) -> bool:
        return bool(self._stops)

    def stopped_by_strings(self, running: dict) -> list:
        """Feed every running sequence's newly appended tokens to its stop-string detector (``running``:
        seq_id -> scheduler Sequence); -> the sequences whose output now holds a stop string."""
        stopped = []
        for seq_id, (request_id, detector) in self._stops.items():
            seq = running.get(seq_id)
            if seq is None or seq.request_id != request_id or detector.matched:
                continue
            start = seq.num_prompt_tokens + detector.num_tokens
            if len(seq.token_ids) > start and detector.feed(seq.token_ids[start:]):
                stopped.append(seq)
        return stopped

    def rows(self, output: SchedulerOutput) -> dict[int, SamplingRow]:
        """The sampling settings of every row the step samples (n > 1 siblings sample from their leader's row)."""
        rows = {}
        for it in output.scheduled:
            if it.sample:
                rows[it.seq_id] = self._row(it.seq_id, it.request_id, it.sample_index, it.num_output_tokens)
                for seq_id, sample_index in it.fork_samples:
                    rows[seq_id] = self._row(seq_id, it.request_id, sample_index, 0)
        return rows

    def _row(self, seq_id: int, request_id: str, sample_index: int, num_output_tokens: int) -> SamplingRow:
        row = self._rows.get(seq_id)
        if row is None or row.sample_index != sample_index:
            row = self._rows[seq_id] = SamplingRow.from_params(self._params[request_id], sample_index,
                                                               num_output_tokens)
        row.step = num_output_tokens     # the only per-step field (keys seeded draws)
        return row

    def record(self, pending, version: int, live: Callable) -> dict[int, int]:
        """Read a queued step's rows: record each live row's logprob, version and top logprobs.
        -> seq_id -> sampled token for every row (``Scheduler.update`` ignores rows that ended)."""
        token_ids, logprobs, tops = pending.read_rows()
        items, rows = pending.items, pending.rows
        all_logprobs, all_versions = self._logprobs, self._versions
        sampled = {}
        for r, (i, seq_id) in enumerate(zip(pending.row_items, pending.row_seq_ids)):
            sampled[seq_id] = token_ids[r]
            if live(items[i]) is None:   # the row's item (a fork's: its leader's) ended since it was queued
                continue
            all_logprobs[seq_id].append(logprobs[r])
            all_versions[seq_id].append(version)
            if tops is not None and rows[r].num_logprobs is not None:
                self._top_logprobs[seq_id].append(tops[r])
        return sampled

    def completion(self, f: FinishedSequence, request_done: bool) -> Completion:
        """The Completion of a finished sequence; ``request_done``: its request has no unfinished sample left."""
        logprobs = self._logprobs.pop(f.seq_id)
        versions = self._versions.pop(f.seq_id)
        self._rows.pop(f.seq_id, None)   # a session's next turn may bring other params
        top = self._top_logprobs.pop(f.seq_id, None)
        if request_done:
            self._params.pop(f.request_id, None)  # its last sample is out (several may finish in one step)
        finish_reason, text, stop_string = f.finish_reason, None, None
        entry = self._stops.pop(f.seq_id, None)
        if entry is not None:
            detector = entry[1]
            # Tokens the step that ended it appended (its last one, with EOS or max_tokens) are read here.
            if detector.feed(f.output_token_ids[detector.num_tokens:]) and finish_reason == "length":
                finish_reason = "stop"    # the last token allowed completed a stop string
            # NOTE: a step appends one token per sample, and a match finishes the sample in the step that made it,
            # so the token that completed a match is always the last one (token ids are never cut).
            assert not detector.matched or detector.num_tokens == len(f.output_token_ids), "tokens past a match"
            text, stop_string = detector.text(), detector.stop_string
        return Completion(request_id=f.request_id, sample_index=f.sample_index,
                          prompt_token_ids=f.prompt_token_ids, token_ids=f.output_token_ids,
                          logprobs=logprobs, versions=versions, finish_reason=finish_reason,
                          num_cached_tokens=f.num_cached_tokens, top_logprobs=top, session_id=f.session_id,
                          num_prefill_tokens=f.num_prefill_tokens, queue_wait_s=f.queue_wait_s,
                          text=text, stop_string=stop_string)

    def partial(self, seq, start: int) -> PartialOutput:
        """A running sequence's output from token ``start`` on, as recorded so far (``seq``: its scheduler
        Sequence). NOTE: ``record`` appends logprobs before ``Scheduler.update`` appends the tokens; between two
        steps both have the same length, the min guards a read in between."""
        logprobs = self._logprobs.get(seq.seq_id, ())
        end = min(len(logprobs), len(seq.token_ids) - seq.num_prompt_tokens)
        if end <= start:
            return PartialOutput(seq.sample_index, start, [], [], [])
        tops = self._top_logprobs.get(seq.seq_id)
        base = seq.num_prompt_tokens
        return PartialOutput(seq.sample_index, start, list(seq.token_ids[base + start:base + end]),
                             list(logprobs[start:end]), list(self._versions[seq.seq_id][start:end]),
                             None if tops is None else list(tops[start:end]))

    def params(self, request_id: str) -> Optional[SamplingParams]:
        return self._params.get(request_id)

    def num_recorded(self, seq_id: int) -> int:
        """Tokens recorded so far for a sequence's current request or turn."""
        return len(self._logprobs.get(seq_id, ()))

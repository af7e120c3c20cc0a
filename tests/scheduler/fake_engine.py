"""A token-level stand-in for the model runner, for scheduler tests.

It keeps a fake KV cache (slot -> (position, token)) written exactly where the scheduler's block
tables say, and computes each sampled token from the context it *reads back* through the block
table and the sample's index (so n > 1 siblings diverge from their first token). A wrong block table,
a shared block overwritten, a sibling writing into its leader's block, or a cache hit on the wrong
contents therefore changes the outputs (or trips an assertion) instead of passing silently.

Copies follow the engine's contract (``scheduler.kv_offload``): every block an output's swap-outs and
swap-ins read is read before any is written. With ``landing_delay`` = k > 0, a restore's device blocks are
written at the end of the k-th ``execute`` after the one that received it (as a copy on a side stream
would land) and reported landed then; a step that reads a block whose copy has not landed trips an
assertion.
"""
from __future__ import annotations

import hashlib

from scheduler import Scheduler, SchedulerOutput, StopCondition


def next_token(context: list[int], vocab: int, sample_index: int = 0) -> int:
    digest = hashlib.blake2b(repr((context, sample_index)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % vocab


class FakeKVEngine:
    def __init__(self, scheduler: Scheduler, vocab: int = 50, landing_delay: int = 0) -> None:
        self.scheduler = scheduler
        self.block_size = scheduler.block_size
        self.vocab = vocab
        self.landing_delay = landing_delay
        self.kv: dict[int, tuple[int, int]] = {}
        self.host: dict[int, tuple[int, int]] = {}   # host slot -> (position, token)
        self.steps_with_queue = 0  # steps where requests waited while others ran
        self._landing: list[tuple[int, dict, list[int]]] = []   # (steps left, slot -> value, seq ids)
        self._unlanded: set[int] = set()                       # device blocks a pending copy will write

    def _read_block(self, src: dict, block: int) -> list:
        bs = self.block_size
        return [src.get(block * bs + i) for i in range(bs)]

    def _write_block(self, dst: dict, block: int, values: list) -> None:
        bs = self.block_size
        for i, value in enumerate(values):
            if value is None:
                dst.pop(block * bs + i, None)
            else:
                dst[block * bs + i] = value

    def execute(self, output: SchedulerOutput, fed: dict[int, int] | None = None) -> dict[int, int]:
        """Run a step; ``fed``: the previous step's samples, for a step planned ahead of it (its first
        ``num_fed`` items carry placeholders: the engine feeds the sampled token)."""
        bs = self.block_size
        # Reads first: swap-outs' device blocks and swap-ins' host blocks.
        outs = [(h, self._read_block(self.kv, d)) for d, h in output.swap_out]
        ins = [(d, self._read_block(self.host, h)) for h, d in output.swap_in]
        for d, _ in output.swap_out:
            assert d not in self._unlanded, f"swap-out of block {d} before its restore landed"
        for src_block, dst_block in output.block_copies:  # a fork's copy of its leader's partial block
            self._write_block(self.kv, dst_block, self._read_block(self.kv, src_block))
        for h, values in outs:                            # device -> host
            self._write_block(self.host, h, values)
        if self.landing_delay:
            pending: dict = {}
            self._write_pending(pending, ins)
        else:
            for d, values in ins:                         # host -> device
                self._write_block(self.kv, d, values)
            self.scheduler.kv_landed(output.restores)
        sampled = {}
        for j, item in enumerate(output.scheduled):
            tokens = [fed[item.seq_id]] if j < output.num_fed else item.token_ids
            assert -1 not in tokens, "a placeholder token reached the fake model"
            for pos in range(item.seq_len):
                assert item.block_ids[pos // bs] not in self._unlanded, (
                    f"sequence {item.seq_id} reads block {item.block_ids[pos // bs]} before its restore landed")
            for i, tok in enumerate(tokens):
                pos = item.start_pos + i
                slot = item.block_ids[pos // bs] * bs + pos % bs
                self.kv[slot] = (pos, tok)
            if item.sample:
                context = []
                for pos in range(item.seq_len):
                    slot = item.block_ids[pos // bs] * bs + pos % bs
                    stored_pos, tok = self.kv[slot]
                    assert stored_pos == pos, f"slot {slot} holds position {stored_pos}, expected {pos}"
                    context.append(tok)
                sampled[item.seq_id] = next_token(context, self.vocab, item.sample_index)
                for fork_seq_id, fork_index in item.fork_samples:   # siblings sample from the same row
                    sampled[fork_seq_id] = next_token(context, self.vocab, fork_index)
        self._tick()
        if self.landing_delay:    # lands at the end of the landing_delay-th execute from now
            self._unlanded.update(d for d, _ in ins)
            self._landing.append((self.landing_delay, pending, list(output.restores)))
        return sampled

    def _write_pending(self, pending: dict, ins: list) -> None:
        bs = self.block_size
        for d, values in ins:
            for i, value in enumerate(values):
                pending[d * bs + i] = value

    def _tick(self) -> None:
        """Copies in flight land after their delay: written, then reported to the scheduler."""
        still = []
        for left, pending, seq_ids in self._landing:
            if left > 1:
                still.append((left - 1, pending, seq_ids))
                continue
            for slot, value in pending.items():
                if value is None:
                    self.kv.pop(slot, None)
                else:
                    self.kv[slot] = value
            self._unlanded.difference_update({slot // self.block_size for slot in pending})
            self.scheduler.kv_landed(seq_ids)
        self._landing = still

    def step(self, check: bool = True):
        out = self.scheduler.schedule()
        finished = self.scheduler.update(out, self.execute(out))
        if check:
            self.scheduler.check_integrity()
        return out, finished

    def run(self, check: bool = True, max_steps: int = 100_000):
        finished = []
        steps = 0
        while self.scheduler.has_unfinished():
            out = self.scheduler.schedule()
            if self.scheduler.waiting and self.scheduler.running:
                self.steps_with_queue += 1
            assert not out.is_empty or self._landing, "scheduler stalled with unfinished work"
            assert out.num_batched_tokens <= self.scheduler.config.max_num_batched_tokens
            finished += self.scheduler.update(out, self.execute(out))
            if check:
                self.scheduler.check_integrity()
            steps += 1
            assert steps < max_steps
        return finished


def reference_output(prompt: list[int], max_tokens: int, vocab: int, eos: frozenset[int] = frozenset(),
                     sample_index: int = 0) -> list[int]:
    tokens = list(prompt)
    out = []
    for _ in range(max_tokens):
        t = next_token(tokens, vocab, sample_index)
        out.append(t)
        tokens.append(t)
        if t in eos:
            break
    return out


def run_turn(s: Scheduler, eng: FakeKVEngine, session_id: str, request_id: str, new: list[int], max_tokens: int):
    """Submit a session turn and step until it finishes; its output must equal the reference."""
    context = s.get_session(session_id).token_ids + list(new)
    s.submit_turn(session_id, request_id, new, StopCondition(max_tokens=max_tokens))
    while True:
        _, fin = eng.step()
        for f in fin:
            if f.request_id == request_id:
                assert f.output_token_ids == reference_output(context, max_tokens, eng.vocab)
                return f


class RandomSessions:
    """Sessions that take turns at random while a test steps the scheduler: each session's first turn starts
    with ``prefix`` (a shared system prompt), turns are submitted with probability ``p_submit`` when the
    session awaits input, and each turn's expected output is kept for ``check``."""

    def __init__(self, s: Scheduler, rng, vocab: int, turns: dict[str, int], prefix: list[int], p_submit: float,
                 new_len: tuple[int, int], max_tokens: tuple[int, int]) -> None:
        self.s, self.rng, self.vocab = s, rng, vocab
        self.plan = dict(turns)                      # session id -> turns left
        self.turn_no = dict.fromkeys(turns, 0)
        self.prefix, self.p_submit, self.new_len, self.max_tokens = prefix, p_submit, new_len, max_tokens
        self.expected: dict[str, list[int]] = {}
        for sid in turns:
            s.open_session(sid)

    @property
    def done(self) -> bool:
        return not self.plan and not self.s.has_unfinished()

    def submit(self) -> None:
        rng, s = self.rng, self.s
        for sid in list(self.plan):
            sess = s.get_session(sid)
            if sess.status.value != "awaiting_input" or rng.random() >= self.p_submit:
                continue
            new = (self.prefix if self.turn_no[sid] == 0 else []) + \
                [rng.randrange(self.vocab) for _ in range(rng.randint(*self.new_len))]
            max_tokens = rng.randint(*self.max_tokens)
            rid = f"{sid}-{self.turn_no[sid]}"
            try:
                s.submit_turn(sid, rid, new, StopCondition(max_tokens=max_tokens))
            except ValueError:
                self.plan.pop(sid)                   # the session outgrew the pool or context: stop it
                s.close_session(sid)
                continue
            self.expected[rid] = reference_output(sess.token_ids, max_tokens, self.vocab)
            self.turn_no[sid] += 1
            self.plan[sid] -= 1
            if self.plan[sid] == 0:
                self.plan.pop(sid)

    def check(self, finished, scenario=None) -> None:
        for f in finished:
            assert f.output_token_ids == self.expected.pop(f.request_id), (scenario, f.request_id)

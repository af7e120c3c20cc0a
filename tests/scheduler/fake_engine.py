"""A token-level stand-in for the model runner, for scheduler tests.

It keeps a fake KV cache (slot -> (position, token)) written exactly where the scheduler's block
tables say, and computes each sampled token from the context it *reads back* through the block
table. A wrong block table, a shared block overwritten, or a cache hit on the wrong contents
therefore changes the outputs (or trips an assertion) instead of passing silently.
"""
from __future__ import annotations

import hashlib

from scheduler import Scheduler, SchedulerOutput


def next_token(context: list[int], vocab: int) -> int:
    digest = hashlib.blake2b(repr(context).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % vocab


class FakeKVEngine:
    def __init__(self, scheduler: Scheduler, vocab: int = 50) -> None:
        self.scheduler = scheduler
        self.block_size = scheduler.block_size
        self.vocab = vocab
        self.kv: dict[int, tuple[int, int]] = {}
        self.host: dict[int, tuple[int, int]] = {}   # host slot -> (position, token)
        self.steps_with_queue = 0  # steps where requests waited while others ran

    def execute(self, output: SchedulerOutput) -> dict[int, int]:
        bs = self.block_size
        for src_block, dst_block in output.block_copies:  # a fork's copy of its leader's partial block, first
            self._copy_block(self.kv, src_block, self.kv, dst_block)
        for src_block, dst_block in output.swap_out:     # device -> host
            self._copy_block(self.kv, src_block, self.host, dst_block)
        for src_block, dst_block in output.swap_in:      # host -> device
            self._copy_block(self.host, src_block, self.kv, dst_block)
        sampled = {}
        for item in output.scheduled:
            for i, tok in enumerate(item.token_ids):
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
                sampled[item.seq_id] = next_token(context, self.vocab)
                for fork_seq_id, _ in item.fork_samples:   # siblings sample from the same row
                    sampled[fork_seq_id] = sampled[item.seq_id]
        return sampled

    def _copy_block(self, src: dict, src_block: int, dst: dict, dst_block: int) -> None:
        bs = self.block_size
        for i in range(bs):
            value = src.get(src_block * bs + i)
            if value is None:
                dst.pop(dst_block * bs + i, None)
            else:
                dst[dst_block * bs + i] = value

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
            assert not out.is_empty, "scheduler stalled with unfinished work"
            assert out.num_batched_tokens <= self.scheduler.config.max_num_batched_tokens
            finished += self.scheduler.update(out, self.execute(out))
            if check:
                self.scheduler.check_integrity()
            steps += 1
            assert steps < max_steps
        return finished


def reference_output(prompt: list[int], max_tokens: int, vocab: int, eos: frozenset[int] = frozenset()) -> list[int]:
    tokens = list(prompt)
    out = []
    for _ in range(max_tokens):
        t = next_token(tokens, vocab)
        out.append(t)
        tokens.append(t)
        if t in eos:
            break
    return out

"""The vLLM-style recompute baseline (benchmarks only), as its own policy.

Admission reserves only the context's blocks (no room for the output is promised); when a running
sequence needs a block and none is left, the newest admitted other running sequence is evicted: its KV is
thrown away and it is queued again, to recompute everything it had computed (``preemptions``,
``recomputed_tokens``). n > 1 siblings recompute the last prompt token's block each, as vLLM does.
"""
from __future__ import annotations

from scheduler.kv_manager import cdiv
from scheduler.policy import PreemptionPolicy


class RecomputePolicy(PreemptionPolicy):
    name = "recompute"
    preempts = True
    shares_partial_blocks = False

    def sequence_blocks(self, seq) -> int:
        return cdiv(seq.num_tokens, self.block_size)          # the context only, what must fit now

    def fork_shared_blocks(self, num_prompt: int) -> int:
        # each sibling recomputes the last prompt token (for its own logits): it shares the blocks before it
        return (num_prompt - 1) // self.block_size

    def group_blocks(self, seq, num_held: int) -> int:
        return max(0, self.sequence_blocks(seq) - num_held)  # siblings take blocks as they go

    def fork_reservation(self, seq) -> int:
        return 0

    def on_shortage(self, sched, seq, scheduled) -> bool:
        kv = sched.kv
        while kv.headroom == 0:
            victims = [s for s in sched.running.values() if s is not seq and s.kv_ready]
            if not victims:
                return False
            sched.preempt(victims[-1], scheduled)              # the newest admitted
        kv.allocate(seq)
        return True

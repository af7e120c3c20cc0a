"""What several benchmarks measure on an engine the same way: copy bandwidth (the floor's denominator), the weight
bytes a decode step reads, one engine step of B synthetic decodes (``decode_step_times``), the engine's own step
between ``LLMEngine.step`` returns (``engine_step_ms``), and one timed ``generate`` with the engine's time split
(``run_ours``). Used by throughput.py, moe_gpu.py, batch_invariant.py and peer_gpu.py."""
from __future__ import annotations

import random
import statistics
import time

import torch

from benchmarks.timing import timed_methods
from engine import LLMEngine, SamplingParams
from engine.sampling import SamplingRow
from scheduler import ScheduledSequence, SchedulerOutput


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ copy
def copy_bandwidth(device: str, nbytes: int) -> float:
    """GB/s, bytes read + written, median of 20 copies."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def weight_bytes_read(eng: LLMEngine) -> int:
    """Bytes a decode step reads of the weights: every parameter once, the embedding table only when it is
    the (tied) lm_head (an untied table is only gathered: B rows)."""
    model = eng.model
    total = 0
    for name, p in model.named_parameters():  # a tied Parameter is listed once
        if name == "embed_tokens.weight" and model.lm_head.weight is not p:
            continue
        total += p.numel() * p.element_size()
    return total


# ------------------------------------------------------------------------------------------------ decode
def decode_step_times(eng: LLMEngine, batches, ctx: int, iters: int) -> list[dict]:
    """Median wall time of runner.execute for B synthetic 1-token decodes at context ``ctx``."""
    bs = eng.config.block_size
    mc = eng.model_config
    kv_token_bytes = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * torch.empty((), dtype=eng.dtype).element_size()
    blocks_per_seq = -(-ctx // bs)
    num_blocks = eng.stats()["num_total_blocks"]
    out = []
    for b in batches:
        if b * blocks_per_seq > num_blocks:
            log(f"  skip batch {b}: needs {b * blocks_per_seq} KV blocks of {num_blocks}")
            continue
        perm = torch.randperm(num_blocks)[:b * blocks_per_seq].view(b, blocks_per_seq).tolist()
        items = [ScheduledSequence(seq_id=i, request_id=f"d{i}", sample_index=0, token_ids=[(7 * i + 3) % eng.vocab_size],
                                   start_pos=ctx - 1, block_ids=perm[i], sample=True, num_output_tokens=1)
                 for i in range(b)]
        output = SchedulerOutput(scheduled=items, num_batched_tokens=b)
        rows = {i: SamplingRow(0.0, -1, 1.0, 0.0, None, 0, 1, None) for i in range(b)}
        row = {"batch": b, "ctx": ctx}
        modes = [("graph", True), ("eager", False)] if eng.runner.graphs is not None else [("eager", False)]
        for mode, use in modes:
            eng.runner.use_cuda_graphs = use
            for _ in range(3):
                eng.runner.execute(output, rows)
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                eng.runner.execute(output, rows)  # ends with the host sync on the sampled ids
                times.append(time.perf_counter() - t0)
            row[f"{mode}_ms"] = 1e3 * statistics.median(times)
        graphs = eng.runner.graphs
        if graphs is not None and eng.config.device.startswith("cuda"):
            # the graph alone, back to back on the device: the GPU part of the step
            pb = graphs.padded_batch(b)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                graphs.replay(pb)
            end.record()
            torch.cuda.synchronize()
            row["replay_ms"] = start.elapsed_time(end) / 50
        eng.runner.use_cuda_graphs = True
        row["engine_ms"] = engine_step_ms(eng, b, ctx, iters)
        row["kv_bytes"] = b * ctx * kv_token_bytes
        out.append(row)
    return out


def engine_step_ms(eng: LLMEngine, batch: int, ctx: int, iters: int) -> float:
    """Median wall time between successive ``LLMEngine.step`` returns while ``batch`` real requests decode at
    context ~``ctx``: the engine's own decode step, scheduling and result processing included (overlapped
    with the device by async scheduling when it is on)."""
    rng = random.Random(batch)
    prompts = [[rng.randrange(eng.vocab_size) for _ in range(ctx - 4)] for _ in range(batch)]
    ids = [eng.add_request(p, SamplingParams(max_tokens=iters + 40, ignore_eos=True)) for p in prompts]
    sched = eng.scheduler
    while sched.waiting or any(s.num_output_tokens < 3 for s in sched.running.values()):
        eng.step()   # prefill, then a few decodes: the pipeline is full from here on
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    for rid in ids:
        eng.abort(rid)
    while eng.has_unfinished():
        eng.step()
    return 1e3 * statistics.median(times)


# ------------------------------------------------------------------------------------------------ workloads
def w1_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_ours(eng: LLMEngine, prompts, params, keep_outputs: bool = False, warm_up: bool = True) -> dict:
    """Output tok/s of one ``generate`` of the whole workload, with the engine's time split; ``keep_outputs``: the
    Completions too (under "outputs"); ``warm_up``: a short generate on the prompts' first tokens first."""
    if warm_up:
        eng.generate([p[:32] for p in prompts[:4]], SamplingParams(max_tokens=8, ignore_eos=True))
    before = eng.stats()
    counts_before = dict(eng.runner.step_counts)
    acc: dict = {}
    timed = ((eng.scheduler, "schedule"), (eng.scheduler, "schedule_decode_ahead"), (eng.runner, "launch"),
             (eng.scheduler, "update"))
    with timed_methods(timed, acc):
        sync(eng.config.device)
        t0 = time.perf_counter()
        outs = eng.generate(prompts, params)
        sync(eng.config.device)
        wall = time.perf_counter() - t0
    acc["other (waiting for the device, outputs)"] = wall - sum(acc.values())
    after = eng.stats()
    n_out = sum(len(c.token_ids) for c in outs)
    return {"requests": len(prompts), "samples": len(outs), "output_tokens": n_out, "wall_s": wall,
            "tok_s": n_out / wall, "steps": after["steps"] - before["steps"],
            "prefill_tokens": after["prefill_tokens"] - before["prefill_tokens"],
            "cached_prompt_tokens": after["cached_prompt_tokens"] - before["cached_prompt_tokens"],
            "preemptions": after["preemptions"],
            "time_split_s": {k: round(v, 3) for k, v in acc.items()},
            "runner_steps": {k: v - counts_before[k] for k, v in eng.runner.step_counts.items()},
            "steps_ahead": after["steps_ahead"] - before["steps_ahead"], **({"outputs": outs} if keep_outputs else {})}


__all__ = ["copy_bandwidth", "decode_step_times", "engine_step_ms", "log", "run_ours", "sync", "w1_prompts",
           "weight_bytes_read"]

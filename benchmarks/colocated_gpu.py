"""A trainer and a rollout worker on one GPU, through the pool: CUDA IPC weight pushes next to the raw copy of the
same bytes, and sleep / wake measured from the trainer's side of the device.

    python benchmarks/colocated_gpu.py [--shapes qwen2.5-0.5b,llama-3.1-8b] [--repeats 5]

Per shape (random bf16 weights; the trainer holds them with Hugging Face names, the engine loads dummy weights):
- a ``RolloutPool`` of one worker with ``num_gpus_per_worker=0.5`` on the trainer's GPU, ``WeightPusher`` (CUDA
  IPC): one warm-up push (maps the trainer's buffers and validates the layout), then ``--repeats`` timed pushes.
  Columns: pack (the trainer's copy of its weights into its send buffers), apply (the rest: the pool's call, the
  engine's copy out of the mapped buffers into its parameters, the version barrier), both against the raw copy
  of the same bytes measured here (device-to-device, buffer to buffer). After the pushes the worker's parameter
  digest (``pool.weights_digests``) must change with each set of weights pushed and come back to the same value
  for the same set (a push that did not land is caught; the bitwise comparison with a fresh engine on the same
  weights is tests/rollout/test_colocated_gpu.py).
- ``sleep(1)`` / ``wake_up`` and ``sleep(2)`` / ``wake_up`` + push: device memory the trainer's process sees
  come back (``torch.cuda.mem_get_info``) against the KV (and weight) bytes the engine reports, and the times.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.report import append_results, markdown_table  # noqa: E402
from benchmarks.weight_sync_gpu import copy_bandwidth, random_state_dict, timed, write_config  # noqa: E402

logger = logging.getLogger("colocated_gpu")
SPLIT = ("to_worker", "to_engine_thread", "loader", "apply", "return", "pool")   # PushReport.stages after pack


def run(coro, timeout: float = 600):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def bench_shape(shape: str, repeats: int, root: Path, util: float) -> dict:
    import ray

    from engine import EngineConfig, SamplingParams
    from rollout.pool import RolloutPool
    from rollout.weight_push import WeightPusher
    path = write_config(shape, root / shape)
    dev = torch.device("cuda", torch.cuda.current_device())
    cfg = EngineConfig(model=str(path), device="cuda", dtype="bfloat16", load_format="dummy", max_model_len=4096,
                       max_num_seqs=64, gpu_memory_utilization=util, fixed_address_memory=True)
    pool = RolloutPool(cfg, 1, num_gpus_per_worker=0.5, start_timeout_s=600)
    try:
        weights = [random_state_dict(path, dev, seed=s) for s in (1, 2)]
        nbytes = sum(t.numel() * t.element_size() for t in weights[0].values())
        pusher = WeightPusher(pool)
        assert pusher.transport == "cuda_ipc", pusher.transport
        def digest_now() -> str:
            return run(pool.weights_digests())[0]["digest"]

        def push_and_digest(w) -> str:
            pusher.push(w, version=pool.version + 1)
            return digest_now()
        # the warm-up push maps the buffers and validates the layout (timed alone: the digest reads every byte)
        warm_s = pusher.push(weights[0], version=pool.version + 1).seconds
        d0 = digest_now()
        d1 = push_and_digest(weights[1])
        pushes = [pusher.push(weights[i % 2], version=pool.version + 1) for i in range(repeats)]
        # a push that did not land would leave the other set's digest: alternate and compare
        landed = d0 != d1 and push_and_digest(weights[1]) == d1 and push_and_digest(weights[0]) == d0
        src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        raw = statistics.median(timed(lambda: dst.copy_(src), dev) for _ in range(max(3, repeats)))
        src = dst = None
        torch.cuda.empty_cache()

        prompts = [[(7 * i + j) % 1000 + 5 for j in range(32)] for i in range(16)]
        greedy = SamplingParams(max_tokens=16, ignore_eos=True)

        def tokens():   # one prompt at a time: the same batches every time (the logits depend on the batch)
            return [ray.get(pool.generate_refs([p], greedy))[0][0].token_ids for p in prompts]
        before = tokens()
        torch.cuda.synchronize()
        free0 = torch.cuda.mem_get_info()[0]
        t0 = time.perf_counter()
        [s1] = run(pool.sleep(1))
        sleep1_s = time.perf_counter() - t0
        free1 = torch.cuda.mem_get_info()[0]
        t0 = time.perf_counter()
        [w1] = run(pool.wake_up())
        wake1_s = time.perf_counter() - t0
        after = tokens()
        free2 = torch.cuda.mem_get_info()[0]
        [s2] = run(pool.sleep(2))
        free3 = torch.cuda.mem_get_info()[0]
        t0 = time.perf_counter()
        run(pool.wake_up())
        pusher.push(weights[0], version=pool.version + 1)
        wake2_s = time.perf_counter() - t0
        after2 = tokens()
        pusher.close()
        apply = [p.seconds - p.pack_seconds for p in pushes]
        pack = [p.pack_seconds for p in pushes]
        engine_s = [p.engine_seconds for p in pushes]
        stages = {k: statistics.median(p.stages[k] for p in pushes) for k in pushes[0].stages}
        return dict(shape=shape, bytes=nbytes, warmup_s=warm_s, raw_s=raw,
                    pack_s=statistics.median(pack), apply_s=statistics.median(apply),
                    engine_s=statistics.median(engine_s), stages=stages, channels=",".join(pushes[0].channels),
                    total_s=statistics.median(p.seconds for p in pushes), landed=landed,
                    kv_bytes=s1["kv_bytes"], sleep1_freed=free1 - free0, sleep1_s=sleep1_s, wake1_s=wake1_s,
                    wake1_graphs=w1["graphs_captured"], wake1_graphs_kept=w1["graphs_kept"],
                    same_tokens_after_wake=before == after,
                    sleep2_freed=free3 - free2, sleep2_expected=s2["kv_bytes"] + s2["weight_bytes"],
                    wake2_push_s=wake2_s, same_tokens_after_level2=before == after2)
    finally:
        pool.close()


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b,llama-3.1-8b")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("colocated_gpu needs CUDA")
    import ray
    from rollout.pool_slots import default_runtime_env
    ray.init(address="local", num_gpus=1, include_dashboard=False, log_to_driver=False, runtime_env=default_runtime_env())
    bw = copy_bandwidth(torch.device("cuda"))
    rows, results = [], []
    with tempfile.TemporaryDirectory() as root:
        for shape in args.shapes.split(","):
            r = bench_shape(shape, args.repeats, Path(root), args.gpu_memory_utilization)
            results.append(r)
            logger.info("%s", r)
            rows.append([shape, f"{r['bytes'] / 1e9:.2f}", f"{r['raw_s'] * 1e3:.2f}", f"{r['pack_s'] * 1e3:.2f}",
                         f"{r['apply_s'] * 1e3:.2f}", f"{r['engine_s'] * 1e3:.2f}",
                         " / ".join(f"{r['stages'].get(k, float('nan')) * 1e3:.2f}" for k in SPLIT), r["channels"],
                         f"{r['apply_s'] / r['raw_s']:.2f}x",
                         f"{r['total_s'] / r['raw_s']:.2f}x", "yes" if r["landed"] else "NO",
                         f"{r['sleep1_freed'] / r['kv_bytes'] * 100:.1f}%", f"{r['sleep1_s']:.2f} / {r['wake1_s']:.2f}",
                         "yes" if r["same_tokens_after_wake"] else "NO",
                         f"{r['sleep2_freed'] / r['sleep2_expected'] * 100:.1f}%", f"{r['wake2_push_s']:.2f}",
                         "yes" if r["same_tokens_after_level2"] else "NO"])
    ray.shutdown()
    headers = ["shape", "GB (bf16)", "raw copy ms", "pack ms", "apply ms (pool)", "in engine ms",
               "apply split ms: " + " / ".join(SPLIT), "call carried by", "apply / raw", "pack+apply / raw",
               "landed", "sleep(1) freed / KV", "sleep(1) / wake s", "same greedy after wake",
               "sleep(2) freed / (KV+weights)", "wake+push s", "same greedy after level 2"]
    table = markdown_table(headers, rows)
    print(table)
    notes = (f"Device-to-device copy bandwidth in the same run: {bw['gbps_read_write']:.0f} GB/s (read + write). "
             "Raw copy: the pushed bytes copied buffer to buffer once on the device (the least an update can cost); "
             "pack: the trainer's copy into its IPC buffers; apply: from the pool call to its return (Ray call, "
             "engine copy, version barrier), split by rollout.weight_push.PushReport.stages; medians of "
             f"{args.repeats} pushes after one warm-up. Freed memory is "
             "what torch.cuda.mem_get_info in the trainer's process gained.")
    if not args.no_append:
        append_results("Colocated trainer + worker: CUDA IPC through the pool, sleep / wake", "cuda", table, notes)
    return results


if __name__ == "__main__":
    main()

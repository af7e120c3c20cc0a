"""Weight-update time vs bytes for each loader that runs on CPU, beside the raw transfer of the same bytes.

    python -m benchmarks.weight_sync [--repeats 3] [--bucket-mb 64] [--no-results]
    python -m benchmarks.weight_sync --gpu [--tiny] [--shapes ...] [--gpu-bucket-mb 256,1024] [--out DIR]

GPU mode (``--gpu``): see benchmarks/weight_sync_gpu.py (CUDA IPC on one GPU, NCCL across two, each beside the raw
transfer of the same bytes; table printed, JSON + a markdown section written to --out, default $OUT or
out/weight_sync_gpu). Without CUDA, ``--gpu --tiny`` runs its code paths on the CPU (gloo; IPC skipped).

A synthetic Llama-shaped model (~245 MB fp32 by default) is written once as safetensors (W2) and applied onto a
model holding W1 through: the state-dict loader (with full backup, and with backup_budget_bytes=0), the
safetensors loader (page cache warm), the gloo distributed loader (sender in a spawned process) and the Ray
object loader. "raw" is the floor for the same bytes in the same run: a tensor copy of every parameter (local
loaders), bucketed gloo broadcasts with no packing or apply (distributed), ray.put + get + copy (Ray).
Appends a dated section to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if not __package__:  # run as a script: its own folder would shadow the weight_sync package
    sys.path[0] = str(ROOT)

import torch  # noqa: E402

# ~61M parameters: embed 16384x1024 (tied) + 4 layers x 11.2M
MODEL = dict(vocab_size=16384, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
             num_attention_heads=16, num_key_value_heads=4, head_dim=64, initializer_range=0.02)


def _median_time(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _chunks(total: int, bucket: int) -> list[int]:
    return [bucket] * (total // bucket) + ([total % bucket] if total % bucket else [])


def _gloo_sender(port: int, path: str, bucket_bytes: int, repeats: int) -> None:
    """Rank 0: per repeat a barrier then one update; then per repeat a barrier then raw broadcasts."""
    from safetensors.torch import load_file

    from weight_sync import DistributedSender, init_weight_sync_group

    torch.set_num_threads(1)
    group = init_weight_sync_group("127.0.0.1", port, 0, 2, timeout_s=300)
    sd = load_file(path)
    sender = DistributedSender(group, bucket_bytes=bucket_bytes)
    barrier = torch.zeros(1)
    for _ in range(repeats):
        group.broadcast(barrier, 0).wait()
        sender.send(sd)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    flat = torch.empty(total, dtype=torch.uint8)
    for _ in range(repeats):
        group.broadcast(barrier, 0).wait()
        offset = 0
        for size in _chunks(total, bucket_bytes):
            group.broadcast(flat[offset:offset + size], 0).wait()
            offset += size


def run(repeats: int, bucket_bytes: int) -> list[tuple[str, int, float, float]]:
    """-> rows of (loader, bytes, update seconds, raw seconds)."""
    import numpy as np
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from engine.tiny_models import make_tiny_model
    from engine.weight_update import WeightUpdater
    from engine.weights import load_model
    from weight_sync import RayObjectLoader, SafetensorsLoader, StateDictLoader, init_weight_sync_group, \
        put_state_dict
    from weight_sync.distributed import DistributedLoader

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        w1 = make_tiny_model("llama", Path(tmp) / "w1", seed=1, **MODEL)
        w2 = make_tiny_model("llama", Path(tmp) / "w2", seed=2, **MODEL)
        model, config = load_model(w1, torch.float32, "cpu")
        updater = WeightUpdater(model, config)
        sd = load_file(str(w2 / "model.safetensors"))
        params = dict(model.named_parameters())
        nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        pairs = [(params[t.param_name].data, t.shard, sd[n]) for n in sd
                 if (t := updater.mapper.resolve(n)) is not None]

        def raw_copy():
            for dst, shard, src in pairs:
                (dst if shard is None else dst[shard]).copy_(src)

        raw = _median_time(raw_copy, repeats)
        rows.append(("state_dict", nbytes, _median_time(lambda: updater.apply(StateDictLoader(sd)), repeats), raw))
        rows.append(("state_dict (no backup)", nbytes, _median_time(
            lambda: updater.apply(StateDictLoader(sd), backup_budget_bytes=0), repeats), raw))
        rows.append(("safetensors", nbytes, _median_time(lambda: updater.apply(SafetensorsLoader(w2)), repeats), raw))

        # gloo: the sender is another process; each timed region starts after a barrier broadcast
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        child = ctx.Process(target=_gloo_sender, args=(port, str(w2 / "model.safetensors"), bucket_bytes, repeats))
        child.start()
        group = init_weight_sync_group("127.0.0.1", port, 1, 2, timeout_s=300)
        barrier = torch.zeros(1)
        sync = lambda: group.broadcast(barrier, 0).wait()  # noqa: E731
        update = _median_time(lambda: updater.apply(DistributedLoader(group, src=0)), repeats, before=sync)

        def raw_broadcast():
            for size in _chunks(nbytes, bucket_bytes):
                group.broadcast(torch.empty(size, dtype=torch.uint8), 0).wait()

        rows.append(("distributed (gloo)", nbytes, update, _median_time(raw_broadcast, repeats, before=sync)))
        child.join(timeout=300)

        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            flat = torch.empty(nbytes, dtype=torch.uint8)
            src = np.random.randint(0, 255, nbytes, dtype=np.uint8)

            def ray_update():
                updater.apply(RayObjectLoader(put_state_dict(sd, bucket_bytes)))

            def ray_raw():
                got = ray.get(ray.put(src))
                with warnings.catch_warnings():  # read-only object-store array; only read here
                    warnings.simplefilter("ignore", UserWarning)
                    flat.copy_(torch.from_numpy(got))

            rows.append(("ray objects (put + apply)", nbytes, _median_time(ray_update, repeats),
                         _median_time(ray_raw, repeats)))
        finally:
            ray.shutdown()
    return rows


def table(rows: list[tuple[str, int, float, float]]) -> str:
    lines = ["| loader | MB | update s | update GB/s | raw s | raw GB/s | update / raw |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, nbytes, t, raw in rows:
        lines.append(f"| {name} | {nbytes / 1e6:.0f} | {t:.3f} | {nbytes / t / 1e9:.2f} | {raw:.3f} | "
                     f"{nbytes / raw / 1e9:.2f} | {t / raw:.1f}x |")
    return "\n".join(lines)


def main_gpu(args) -> None:
    import os

    from benchmarks import weight_sync_gpu as wsg
    from benchmarks.report import git_commit

    if not torch.cuda.is_available():
        if not args.tiny:
            raise SystemExit("weight_sync --gpu: no CUDA device here. The GPU figures need one (one GPU for the IPC "
                             "case, two for NCCL); `--gpu --tiny` runs the same code paths on the CPU instead.")
        print("weight_sync --gpu --tiny: no CUDA here -> CPU fallback: tiny qwen2 config, gloo instead of NCCL, "
              "IPC case skipped. These are code-path checks, not GPU figures.", flush=True)
    shapes = [wsg.TINY] if args.tiny else [s for s in args.shapes.split(",") if s]
    buckets = [int(b) for b in args.gpu_bucket_mb.split(",") if b]
    demo = None if args.demo_shapes is None else [s for s in args.demo_shapes.split(",") if s]
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "out" / "weight_sync_gpu")
    commit = os.environ.get("WEIGHT_SYNC_COMMIT") or git_commit()  # the device machine's copy may lack .git
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory() as tmp:
        results = wsg.run(shapes, buckets, args.repeats or 5, args.tiny, demo,
                          lambda r: wsg.save(r, out_dir, commit, stamp), Path(tmp), args.case_timeout,
                          args.total_timeout)
    md = wsg.save(results, out_dir, commit, stamp)
    print(md.read_text())
    print(f"wrote {md} and {out_dir / 'weight_sync_gpu.json'}")
    if results.get("errors"):
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3 on CPU, 5 with --gpu)")
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--no-results", action="store_true", help="print only; do not append to RESULTS.md")
    gpu = parser.add_argument_group("GPU mode")
    gpu.add_argument("--gpu", action="store_true", help="CUDA IPC and NCCL cases (benchmarks/weight_sync_gpu.py)")
    gpu.add_argument("--tiny", action="store_true", help="tiny model; without CUDA, a CPU run of the code paths")
    gpu.add_argument("--shapes", default="qwen2.5-1.5b,llama-3.1-8b")
    gpu.add_argument("--gpu-bucket-mb", default="256,1024", help="comma list; the first is the default size")
    gpu.add_argument("--demo-shapes", default=None, help="shapes that run the keep-mode demo (default: all)")
    gpu.add_argument("--case-timeout", type=float, default=600.0, help="seconds per case (IPC, NCCL)")
    gpu.add_argument("--total-timeout", type=float, default=None, help="seconds for all cases together")
    gpu.add_argument("--out", default=None, help="folder for weight_sync_gpu.{json,md} (default $OUT)")
    args = parser.parse_args()
    if args.gpu or args.tiny:
        return main_gpu(args)
    args.repeats = args.repeats or 3
    torch.set_num_threads(1)
    rows = run(args.repeats, args.bucket_mb << 20)
    text = table(rows)
    print(text)
    if args.no_results:
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    results = ROOT / "benchmarks" / "RESULTS.md"
    if not results.exists():
        results.write_text("# Benchmark results (each benchmark appends dated sections)\n")
    section = (f"\n## weight_sync — {datetime.date.today().isoformat()}\n\n"
               f"Machine: CPU (2 cores), torch {torch.__version__}, 1 torch thread; commit {commit}; "
               f"{args.repeats} repeats (median); buckets {args.bucket_mb} MB; synthetic Llama-shaped model "
               f"(hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, vocab {MODEL['vocab_size']}, "
               f"fp32, tied). Update = WeightUpdater.apply end to end (validation, backup unless noted, copy_); "
               f"raw = the same bytes moved with no loader (tensor copy_ per parameter; bucketed gloo broadcast; "
               f"ray.put + get + copy). Ray's update includes the sender's put_state_dict.\n\n{text}\n")
    with open(results, "a") as f:
        f.write(section)
    print(f"appended to {results}")


if __name__ == "__main__":
    main()

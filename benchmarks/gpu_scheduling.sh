#!/usr/bin/env bash
# Session scheduling on one GPU (issue 14), in three calls that each fit a device lease: correctness first, then
# timings. Logs and JSON go to $OUT; the sections appended to benchmarks/RESULTS.md there are copied to
# $OUT/results_new.md (the device's copy of the tree has no .git: pass ROLLOUT_COMMIT=<hash>).
#
#   bash benchmarks/gpu_scheduling.sh a     GPU tests (engine on CUDA, graphs, host copies, sessions)
#   bash benchmarks/gpu_scheduling.sh b     host-copy test, offload overlap, multi_turn and long_cot on the 0.5B shape
#   bash benchmarks/gpu_scheduling.sh c     offload overlap and multi_turn on the 8B shape
#   bash benchmarks/gpu_scheduling.sh d     b and c without the tests (overlap, multi_turn on both shapes, long_cot)
#   bash benchmarks/gpu_scheduling.sh e     multi_turn on both shapes with every variant (mixed-step graphs off,
#                                           steps planned ahead after decode steps only), overlap 8B
#   bash benchmarks/gpu_scheduling.sh f     split-KV extend: kernel tests, fixed-address sleep tests,
#                                           benchmarks/mixed_attention.py, multi_turn on both shapes, split on and off
#                                           (COLOCATED=1: colocated_gpu.py on 8B too)
#   bash benchmarks/gpu_scheduling.sh g     the IPC push (bucket_apply_gpu.py, colocated_gpu.py on 8B), multi_turn
#                                           on 0.5B (MT8B=1: and 8B) with admissions planned ahead (ours and
#                                           recompute) or not, the sampling kernel (sampling_gpu.py)
#   bash benchmarks/gpu_scheduling.sh h     bucket_apply_gpu.py (its copy splits and kernel configs), multi_turn on
#                                           both shapes with admissions planned ahead (the default) or not (ours and recompute),
#                                           the sampling kernel
#   bash benchmarks/gpu_scheduling.sh j     the sampling kernel and GPU fault tests (verbose, skip reasons), the
#                                           bucket copy and the IPC push (8B), multi_turn 0.5B with the defaults
#   bash benchmarks/gpu_scheduling.sh i     GPU tests (fault paths, sampling kernel, bucket copy, IPC), the IPC push
#                                           (colocated_gpu.py 8B), offload overlap on both shapes, train_step_gpu.py
set -u
part=${1:-a}
out=${OUT:-/tmp/gpu_scheduling}
source benchmarks/gpu_steps.sh   # the card, versions and step()

case "$part" in
a)  step tests 200 python3 -m pytest -q -x -p no:cacheprovider tests/engine/test_kv_offload.py \
        tests/engine/test_triton_engine.py tests/engine/test_cuda_graphs.py tests/engine/test_sessions.py ;;
b)  step tests 60 python3 -m pytest -q -x -p no:cacheprovider tests/engine/test_kv_offload.py
    step overlap_05b 90 python3 benchmarks/offload_overlap.py --shape qwen2.5-0.5b
    step multi_turn_05b 200 python3 benchmarks/multi_turn.py --device cuda --shape qwen2.5-0.5b --dtype bfloat16 \
        --json "$out/multi_turn_05b.json"
    step long_cot_05b 220 python3 benchmarks/long_cot.py --device cuda --shape qwen2.5-0.5b --dtype bfloat16 \
        --json "$out/long_cot_05b.json" ;;
c)  step overlap_8b 90 python3 benchmarks/offload_overlap.py --shape llama-3.1-8b --batch 32 --steps 100
    step multi_turn_8b 450 python3 benchmarks/multi_turn.py --device cuda --shape llama-3.1-8b --dtype bfloat16 \
        --json "$out/multi_turn_8b.json" ;;
d)  step overlap_05b 60 python3 benchmarks/offload_overlap.py --shape qwen2.5-0.5b
    step overlap_8b 70 python3 benchmarks/offload_overlap.py --shape llama-3.1-8b --batch 32 --steps 100
    step multi_turn_05b 90 python3 benchmarks/multi_turn.py --device cuda --shape qwen2.5-0.5b --dtype bfloat16 \
        --json "$out/multi_turn_05b.json"
    step multi_turn_8b 150 python3 benchmarks/multi_turn.py --device cuda --shape llama-3.1-8b --dtype bfloat16 \
        --json "$out/multi_turn_8b.json"
    step long_cot_05b 200 python3 benchmarks/long_cot.py --device cuda --shape qwen2.5-0.5b --dtype bfloat16 ;;
e)  variants=ours,ours-eager-mixed,ours-ahead-after-decode-only,recompute,recompute-ahead-after-decode-only,no-retention
    step multi_turn_8b 260 python3 benchmarks/multi_turn.py --device cuda --shape llama-3.1-8b --dtype bfloat16 \
        --only $variants --json "$out/multi_turn_8b.json"
    step multi_turn_05b 130 python3 benchmarks/multi_turn.py --device cuda --shape qwen2.5-0.5b --dtype bfloat16 \
        --only $variants --json "$out/multi_turn_05b.json"
    step overlap_8b 70 python3 benchmarks/offload_overlap.py --shape llama-3.1-8b --batch 32 --steps 100 ;;
f)  step tests 150 python3 -m pytest -q -x -p no:cacheprovider tests/engine/test_mixed_graphs.py \
        tests/engine/test_kernels.py -k "split_kv or extend or mixed_graph or tiled"
    step tests_sleep 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine/test_device_memory.py \
        tests/engine/test_sleep.py
    step mixed_attention 90 python3 benchmarks/mixed_attention.py
    step multi_turn_8b 200 python3 benchmarks/multi_turn.py --device cuda --shape llama-3.1-8b --dtype bfloat16 \
        --only ours,ours-extend-split,recompute,no-retention --json "$out/multi_turn_8b.json"
    step multi_turn_05b 120 python3 benchmarks/multi_turn.py --device cuda --shape qwen2.5-0.5b --dtype bfloat16 \
        --only ours,ours-extend-split,recompute,no-retention \
        --json "$out/multi_turn_05b.json"
    [ -n "${COLOCATED:-}" ] && step colocated_8b 150 python3 benchmarks/colocated_gpu.py --shapes llama-3.1-8b ;;
g)  step bucket_apply 40 python3 benchmarks/bucket_apply_gpu.py
    step multi_turn_05b 130 python3 benchmarks/multi_turn.py --device cuda --shape qwen2.5-0.5b --dtype bfloat16 \
        --only ours,ours-admissions-not-ahead,recompute,recompute-admissions-not-ahead --json "$out/multi_turn_05b.json"
    step colocated_8b 110 python3 benchmarks/colocated_gpu.py --shapes llama-3.1-8b
    step sampling 110 python3 benchmarks/sampling_gpu.py
    [ -n "${MT8B:-}" ] && step multi_turn_8b 190 python3 benchmarks/multi_turn.py --device cuda --shape llama-3.1-8b \
        --dtype bfloat16 --only ours,ours-admissions-not-ahead,recompute --json "$out/multi_turn_8b.json" ;;
h)  ahead=ours,ours-admissions-not-ahead,recompute,recompute-admissions-not-ahead
    step bucket_apply 70 python3 benchmarks/bucket_apply_gpu.py
    step multi_turn_8b 250 python3 benchmarks/multi_turn.py --device cuda --shape llama-3.1-8b --dtype bfloat16 \
        --only $ahead --json "$out/multi_turn_8b.json"
    step multi_turn_05b 120 python3 benchmarks/multi_turn.py --device cuda --shape qwen2.5-0.5b --dtype bfloat16 \
        --only $ahead --json "$out/multi_turn_05b.json"
    step sampling 100 python3 benchmarks/sampling_gpu.py ;;
i)  step tests 160 python3 -m pytest -q -p no:cacheprovider tests/reliability/test_gpu_faults.py \
        tests/engine/test_sampling_kernel.py tests/engine/test_bulk_copy.py tests/weight_sync/test_cuda_ipc.py \
        tests/weight_sync/test_bucketed_update.py
    step colocated_8b 110 python3 benchmarks/colocated_gpu.py --shapes llama-3.1-8b
    step overlap_05b 60 python3 benchmarks/offload_overlap.py --shape qwen2.5-0.5b
    step overlap_8b 70 python3 benchmarks/offload_overlap.py --shape llama-3.1-8b --batch 32 --steps 100
    step train_step 110 python3 benchmarks/train_step_gpu.py ;;
j)  step tests 170 python3 -m pytest -q -rs -p no:cacheprovider tests/engine/test_sampling_kernel.py \
        tests/engine/test_sampling.py tests/reliability/test_gpu_faults.py -v --durations=5
    step bucket_apply 60 python3 benchmarks/bucket_apply_gpu.py
    step colocated_8b 180 python3 benchmarks/colocated_gpu.py --shapes llama-3.1-8b
    step multi_turn_05b 120 python3 benchmarks/multi_turn.py --device cuda --shape qwen2.5-0.5b --dtype bfloat16 \
        --only ours,ours-admissions-not-ahead,recompute,recompute-admissions-not-ahead --json "$out/multi_turn_05b.json" ;;
esac
tail -n +"$((before + 1))" "$results" > "$out/results_new.md"

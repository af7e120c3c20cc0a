#!/usr/bin/env bash
# Mixture of experts on one GPU (issue 21): the fused MoE path's tests on CUDA, then benchmarks/moe_gpu.py on the
# Qwen3-30B-A3B shape. Logs and JSON go to $OUT; new RESULTS.md sections to $OUT/results_new.md (pass
# ROLLOUT_COMMIT=<hash>: the device's copy of the tree has no .git).
#
#   bash benchmarks/gpu_moe.sh a     tests/engine/test_moe_kernel.py + test_moe.py on CUDA, then moe_gpu.py
#   bash benchmarks/gpu_moe.sh b     moe_gpu.py only
# MOE_ARGS: more moe_gpu.py arguments (--profile, --skip-w)
set -u
part=${1:-a}
out=${OUT:-/tmp/gpu_moe}
source benchmarks/gpu_steps.sh   # the card, versions and step()

case "$part" in
a)  step tests ${TEST_LIMIT:-200} python3 -m pytest -q -rs -p no:cacheprovider tests/engine/test_moe_kernel.py \
        tests/engine/test_moe.py
    step bench ${BENCH_LIMIT:-360} python3 benchmarks/moe_gpu.py --out "$out" ${MOE_ARGS:-} ;;
b)  step bench ${BENCH_LIMIT:-540} python3 benchmarks/moe_gpu.py --out "$out" ${MOE_ARGS:-} ;;
esac
tail -n +"$((before + 1))" "$results" > "$out/results_new.md"

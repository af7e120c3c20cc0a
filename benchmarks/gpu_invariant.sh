#!/usr/bin/env bash
# The batch-invariant mode on one GPU (issue 17): correctness first, then timings. Logs and JSON go to $OUT; the
# sections appended to benchmarks/RESULTS.md there are copied to $OUT/results_new.md (the device's copy of the tree
# has no .git: pass ROLLOUT_COMMIT=<hash>).
#
#   bash benchmarks/gpu_invariant.sh a     GPU tests of tests/engine/test_batch_invariant.py, then
#                                          benchmarks/batch_invariant.py on the three shapes
#   bash benchmarks/gpu_invariant.sh b     benchmarks/batch_invariant.py only
#   bash benchmarks/gpu_invariant.sh c     examples/ppo.py --device cuda --true-on-policy (needs the SmolLM2 GGUF
#                                          parts: see gpu_env.sh)
set -u
part=${1:-a}
out=${OUT:-/tmp/gpu_invariant}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
results=benchmarks/RESULTS.md
before=$(wc -l < "$results")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

step() {   # step NAME SECONDS CMD...: run with a time limit, keep its log, report how long it took
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$out/$name.log"
    echo "=== $name: rc $rc in $((SECONDS - t0)) s"
    tail -n +"$((before + 1))" "$results" > "$out/results_new.md"   # kept if a later step runs out of time
}

case "$part" in
a)  step tests ${TEST_LIMIT:-240} python3 -m pytest -q -x -rs -p no:cacheprovider tests/engine/test_batch_invariant.py
    step bench ${BENCH_LIMIT:-300} python3 benchmarks/batch_invariant.py --out "$out" ;;
b)  step bench ${BENCH_LIMIT:-540} python3 benchmarks/batch_invariant.py --out "$out" ;;
c)  step ppo ${PPO_LIMIT:-540} python3 examples/ppo.py --device cuda --true-on-policy --steps ${PPO_STEPS:-6} \
        --out "$out/ppo" ;;
esac
tail -n +"$((before + 1))" "$results" > "$out/results_new.md"

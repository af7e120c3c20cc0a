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
STEP_TAIL=30
source benchmarks/gpu_steps.sh   # the card, versions and step()

case "$part" in
a)  step tests ${TEST_LIMIT:-240} python3 -m pytest -q -x -rs -p no:cacheprovider tests/engine/test_batch_invariant.py
    step bench ${BENCH_LIMIT:-300} python3 benchmarks/batch_invariant.py --out "$out" ;;
b)  step bench ${BENCH_LIMIT:-540} python3 benchmarks/batch_invariant.py --out "$out" ;;
c)  step ppo ${PPO_LIMIT:-540} python3 examples/ppo.py --device cuda --true-on-policy --steps ${PPO_STEPS:-6} \
        --out "$out/ppo" ;;
esac
tail -n +"$((before + 1))" "$results" > "$out/results_new.md"

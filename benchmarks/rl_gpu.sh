#!/usr/bin/env bash
# The training loop on one lent H200, in parts that each fit one device call (benchmarks/gpu_env.sh first).
#   a: GPU tests of the colocated pool + benchmarks/colocated_gpu.py      (carry .whl: Ray, wheels, tokenizer)
#   b: nothing but the GGUF's first two parts (SmolLM2's real weights)      (carry .whl_a, then .whl_b: two calls)
#   c: examples/ppo.py --device cuda: bf16, bf16 + fp32 lm_head, --async 1  (carry .whl_c: the GGUF's last part)
#   d: benchmarks/rl_step.py on SmolLM2 and the Qwen2.5-0.5B shape (after b, c)
#   e: benchmarks/rl_step.py on the Qwen2.5-0.5B shape only, with long answers (MAX_TOKENS, default 512; needs
#      only .whl: the random shape takes SmolLM2's tokenizer files from $SMOLLM2_TOKENIZER)
#   f: colocated GPU tests + colocated_gpu.py on 8B + rl_step (0.5B, 512 tokens) + episode_overhead, one call
#   g: where an IPC push and a train step go: IPC/bulk-copy GPU tests, bucket_apply_gpu.py (per-tensor copies vs
#      the one-launch kernel), colocated_gpu.py on 8B, train_step_gpu.py (0.5B), episode_overhead, one call
# Logs and RESULTS.md go to $OUT.
part=$1
source benchmarks/gpu_env.sh
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
case $part in
  a)
    [ -n "$TESTS" ] && timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/rollout/test_colocated_gpu.py \
      tests/weight_sync/test_cuda_ipc.py tests/engine/test_fp32_head.py 2>&1 | tail -30 | tee $OUT/tests.log
    timeout 330 python3 benchmarks/colocated_gpu.py --shapes ${SHAPES:-qwen2.5-0.5b,llama-3.1-8b} 2>&1 \
      | grep -v "^\s*$" | tail -12 | tee $OUT/colocated.log ;;
  b)
    ls -la /tmp/gguf_parts ;;
  c)
    steps=${STEPS:-8}
    for run in "bf16" "fp32head --fp32-lm-head" "async --async 1 --tis-cap 2"; do
      name=${run%% *}; extra=${run#"$name"}
      timeout ${PPO_TIMEOUT:-170} python3 examples/ppo.py --device cuda --steps $steps --out $OUT/ppo_$name $extra 2>&1 \
        | grep -E "step [0-9]+|mean reward|Error|error" | tail -40 > $OUT/ppo_$name.log
      tail -3 $OUT/ppo_$name.log
      rm -f $OUT/ppo_$name/ppo.png
    done ;;
  d)
    timeout 280 python3 benchmarks/rl_step.py --device cuda --model smollm2 --steps ${STEPS:-2} --out $OUT/rl_smollm2.json 2>&1 \
      | grep -v "^\s*$" | tail -15 | tee $OUT/rl_smollm2.log
    timeout 280 python3 benchmarks/rl_step.py --device cuda --shape qwen2.5-0.5b --tokenizer "$SMOLLM2_TOKENIZER" --steps ${STEPS:-2} --out $OUT/rl_05b.json 2>&1 \
      | grep -v "^\s*$" | tail -15 | tee $OUT/rl_05b.log ;;
  e)
    timeout 300 python3 benchmarks/rl_step.py --device cuda --shape qwen2.5-0.5b --tokenizer "$SMOLLM2_TOKENIZER" \
      --steps ${STEPS:-2} --max-tokens ${MAX_TOKENS:-512} --out $OUT/rl_05b_${MAX_TOKENS:-512}.json 2>&1 \
      | grep -v "^\s*$" | tail -15 | tee $OUT/rl_05b_${MAX_TOKENS:-512}.log ;;
  f)
    # one call while the machine is warm: fixed-address sleep through the pool, the IPC push, one RL step, the
    # pool's episode path against the engine
    timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/rollout/test_colocated_gpu.py \
      tests/weight_sync/test_cuda_ipc.py 2>&1 | tail -15 | tee $OUT/tests.log
    timeout 170 python3 benchmarks/colocated_gpu.py --shapes llama-3.1-8b 2>&1 \
      | grep -v "^\s*$" | tail -12 | tee $OUT/colocated.log
    timeout 200 python3 benchmarks/rl_step.py --device cuda --shape qwen2.5-0.5b --tokenizer "$SMOLLM2_TOKENIZER" \
      --steps 2 --max-tokens 512 --out $OUT/rl_05b_512.json 2>&1 | grep -v "^\s*$" | tail -15 | tee $OUT/rl_05b_512.log
    timeout 100 python3 benchmarks/episode_overhead.py --device cuda --shape qwen2.5-0.5b --ways engine,pool \
      --repeats 2 2>&1 | grep -v "^\s*$" | tail -15 | tee $OUT/episode_overhead.log ;;
  g)
    timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/weight_sync/test_cuda_ipc.py \
      tests/engine/test_bulk_copy.py tests/rollout/test_colocated_gpu.py 2>&1 | tail -15 | tee $OUT/tests.log
    timeout 100 python3 benchmarks/bucket_apply_gpu.py 2>&1 | grep -v "^\s*$" | tail -8 | tee $OUT/bucket_apply.log
    timeout 140 python3 benchmarks/colocated_gpu.py --shapes llama-3.1-8b 2>&1 \
      | grep -v "^\s*$" | tail -8 | tee $OUT/colocated.log
    timeout 110 python3 benchmarks/train_step_gpu.py > $OUT/train_step.log 2>&1; grep "^|" $OUT/train_step.log
    timeout 80 python3 benchmarks/episode_overhead.py --device cuda --shape qwen2.5-0.5b --ways engine,pool \
      --repeats 2 2>&1 | grep -v "^\s*$" | tail -15 | tee $OUT/episode_overhead.log ;;
esac
cp benchmarks/RESULTS.md $OUT/RESULTS.md

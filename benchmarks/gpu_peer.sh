#!/usr/bin/env bash
# This engine and vLLM 0.22.0 side by side on one GPU (issues 19, 14, 21): benchmarks/peer_gpu.py. vLLM's wheels
# travel in chunks (.whl_v1, .whl_v2, ...: benchmarks/vllm_gpu_setup.sh) over consecutive calls while the machine
# stays warm; logs and JSON go to $OUT, the sections appended to benchmarks/RESULTS.md to $OUT/results_new.md (the
# device's copy of the tree has no .git: pass ROLLOUT_COMMIT=<hash>).
#
#   bash benchmarks/gpu_peer.sh stage     stage the carried chunks in /tmp (one call per chunk or two)
#   bash benchmarks/gpu_peer.sh a         install vLLM, then W1 and W3 (~320 s with the shared warm-up)
#   bash benchmarks/gpu_peer.sh s         install vLLM, then the sampled workload (~230 s)
#   bash benchmarks/gpu_peer.sh b         the multi_turn sessions on both shapes
#   bash benchmarks/gpu_peer.sh c         the MoE GPU tests and benchmarks/moe_gpu.py (gpu_moe.sh a), no vLLM
#   bash benchmarks/gpu_peer.sh d         the MoE workload (qwen3-30b-a3b) side by side
#   bash benchmarks/gpu_peer.sh e         the 0.5B sessions: vLLM and ours (peer_gpu), then multi_turn.py's in-engine
#                                         baselines (recompute, no-retention) with ours again, in one call
#   bash benchmarks/gpu_peer.sh f         the same on the 8B shape
# ONLY=<workloads> and PEER_LIMIT=<seconds> override a part's workloads and time limit.
set -u
part=${1:-a}
if [ "$part" = stage ]; then bash benchmarks/vllm_gpu_setup.sh stage; exit; fi
out=${OUT:-/tmp/gpu_peer}
STEP_TAIL=${STEP_TAIL:-30}
source benchmarks/gpu_steps.sh   # the card, versions and step()
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

case "$part" in
a|s) step vllm_install 150 bash benchmarks/vllm_gpu_setup.sh install || exit 1
    if [ "$part" = a ]; then default=w1,w3; else default=sampled; fi
    step peer_batch ${PEER_LIMIT:-480} python3 benchmarks/peer_gpu.py --only ${ONLY:-$default} \
        --logs "$out/logs" --json "$out/peer_batch.json" ;;
b)  step vllm_install 150 bash benchmarks/vllm_gpu_setup.sh install || exit 1
    step peer_sessions ${PEER_LIMIT:-420} python3 benchmarks/peer_gpu.py --only ${ONLY:-mt05,mt8b} \
        --logs "$out/logs" --json "$out/peer_sessions.json" ;;
c)  TEST_LIMIT=${TEST_LIMIT:-200} BENCH_LIMIT=${BENCH_LIMIT:-300} bash benchmarks/gpu_moe.sh a ;;
d)  step vllm_install 150 bash benchmarks/vllm_gpu_setup.sh install || exit 1
    step peer_moe ${PEER_LIMIT:-420} python3 benchmarks/peer_gpu.py --only ${ONLY:-moe} \
        --logs "$out/logs" --json "$out/peer_moe.json" ;;
e|f) step vllm_install 150 bash benchmarks/vllm_gpu_setup.sh install || exit 1
    if [ "$part" = e ]; then w=mt05 shape=qwen2.5-0.5b lim=150; else w=mt8b shape=llama-3.1-8b lim=300; fi
    step "peer_$w" ${PEER_LIMIT:-240} python3 benchmarks/peer_gpu.py --only "$w" --logs "$out/logs" \
        --json "$out/peer_$w.json"
    step "multi_turn_$w" "$lim" python3 benchmarks/multi_turn.py --device cuda --shape "$shape" --dtype bfloat16 \
        --only ours,recompute,no-retention --json "$out/multi_turn_$w.json" ;;
esac
tail -n +"$((before + 1))" "$results" > "$out/results_new.md"

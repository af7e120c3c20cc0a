# Sourced by the GPU run scripts (gpu_scheduling.sh, gpu_invariant.sh) after they set $out: the card and versions,
# and step NAME SECONDS CMD...: run CMD with a time limit, keep its log in $out, report how long it took, and copy
# the sections it appended to benchmarks/RESULTS.md to $out/results_new.md (kept if a later step runs out of time).
# STEP_TAIL: how many log lines to print (default 25).
mkdir -p "$out"
export PYTHONUNBUFFERED=1
results=benchmarks/RESULTS.md
before=$(wc -l < "$results")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

step() {
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n "${STEP_TAIL:-25}" "$out/$name.log"
    echo "=== $name: rc $rc in $((SECONDS - t0)) s"
    tail -n +"$((before + 1))" "$results" > "$out/results_new.md"
}

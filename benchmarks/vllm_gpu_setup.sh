#!/usr/bin/env bash
# Offline install of vLLM 0.22.0 on the lent GPU machine (no internet there).
#
# The wheels travel in chunks because one device call carries at most 64 MiB: the repo root holds
# .whl_v1, .whl_v2, ... (git-ignored, at most 58 MiB each), so each call carries one chunk next to
# the ~3 MB repo. The 261 MB vllm wheel is split into vllm.whl.partNN pieces spread over the chunks;
# the other files are vLLM's dependency wheels that the machine's image lacks. .whl_v1 also holds
#   VLLM_WHEEL  the vllm wheel's original file name
#   SHA256SUMS  sha256 of the whole vllm wheel and of every other wheel
#   PARTS.SHA256SUMS  sha256 of each vllm.whl.partNN (to name a damaged chunk)
#   MANIFEST    "<chunk> <file>" for every file, so a missing chunk can be named
# torch, triton, torchvision, torchaudio and the nvidia-* CUDA 13 wheels are never carried: the
# machine's own builds are used. vLLM is used from a subprocess with PYTHONPATH=/tmp/vllm_site.
#
# Usage, here (a machine that reaches the package registry), from the repo root:
#   bash benchmarks/vllm_gpu_setup.sh build     download vllm and the wheels in benchmarks/vllm_gpu_wheels.txt
#                                               (CPython 3.12, manylinux x86_64), split the vllm wheel and pack
#                                               everything into .whl_v1, .whl_v2, ... (replacing the old ones)
# Usage (from the repo root on the device machine; it keeps /tmp between calls while warm):
#   bash benchmarks/vllm_gpu_setup.sh stage     copy every .whl_v* chunk present here into
#                                               /tmp/vllm_parts and say what was staged / still missing
#   bash benchmarks/vllm_gpu_setup.sh install   stage what is present, join the vllm parts, verify
#                                               SHA256SUMS (naming any chunk not yet staged), pip
#                                               install into /tmp/vllm_site, check the import.
#                                               If /tmp/vllm_site already holds vllm 0.22.0 it only
#                                               re-checks the import.
# Then: PYTHONPATH=/tmp/vllm_site VLLM_USE_FLASHINFER_SAMPLER=0 python3 ...
# VLLM_PARTS_DIR and VLLM_SITE override /tmp/vllm_parts and /tmp/vllm_site (for testing elsewhere).
set -euo pipefail

VERSION=0.22.0
# the most one chunk holds: a device call carries 64 MiB with the ~3 MB working tree
CHUNK_BYTES=$((56 * 1048576))
PART_SIZE=50M
PARTS=${VLLM_PARTS_DIR:-/tmp/vllm_parts}
SITE=${VLLM_SITE:-/tmp/vllm_site}
DONE=$SITE/.vllm_${VERSION}_installed

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

stage() {
  mkdir -p "$PARTS"
  local found=0 d n bytes
  for d in .whl_v*/; do
    [ -d "$d" ] || continue
    d=${d%/}
    found=1
    n=$(find "$d" -maxdepth 1 -type f | wc -l)
    bytes=$(find "$d" -maxdepth 1 -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
    cp -f "$d"/* "$PARTS"/
    if [ "$n" -le 8 ]; then
      echo "staged $d: $n files, $(mib "$bytes"): $(cd "$d" && ls | tr '\n' ' ')"
    else
      echo "staged $d: $n files, $(mib "$bytes")"
    fi
  done
  [ "$found" = 1 ] || echo "stage: no .whl_v* directory in $PWD (nothing staged)"
  if [ -f "$PARTS/MANIFEST" ]; then
    local missing
    missing=$(missing_chunks)
    if [ -n "$missing" ]; then
      echo "stage: still to stage: $missing"
    else
      echo "stage: all chunks staged in $PARTS"
    fi
  else
    echo "stage: .whl_v1 (MANIFEST, SHA256SUMS, VLLM_WHEEL) not staged yet"
  fi
}

# chunks (from MANIFEST) that have a file not yet in $PARTS; the vllm parts do not count once the
# whole wheel has been joined
missing_chunks() {
  local wheel="" chunk file
  [ -f "$PARTS/VLLM_WHEEL" ] && wheel=$(head -n1 "$PARTS/VLLM_WHEEL")
  while read -r chunk file; do
    [ -n "$file" ] || continue
    [ -f "$PARTS/$file" ] && continue
    case $file in
      vllm.whl.part*) [ -n "$wheel" ] && [ -f "$PARTS/$wheel" ] && continue ;;
    esac
    echo "$chunk"
  done <"$PARTS/MANIFEST" | sort -u | tr '\n' ' '
}

build() {
  local dl=${VLLM_BUILD_DIR:-/tmp/vllm_wheels} wheel f size chunk=1 used=0
  local platform=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3
    --abi none --platform any)
  for n in 1 5 17 24 27 28 31 34 35; do
    case $n in 1) platform+=(--platform manylinux1_x86_64 --platform manylinux2014_x86_64) ;;
      *) platform+=(--platform "manylinux_2_${n}_x86_64") ;; esac
  done
  rm -rf "$dl"
  mkdir -p "$dl"
  python3 -m pip download -q --no-deps "${platform[@]}" -d "$dl" "vllm==$VERSION" \
    -r benchmarks/vllm_gpu_wheels.txt
  wheel=$(cd "$dl" && ls "vllm-$VERSION"-*.whl)
  (cd "$dl" && sha256sum ./*.whl | sed 's| \./| |' >SHA256SUMS && split -b "$PART_SIZE" -d -a 2 "$wheel" vllm.whl.part &&
    sha256sum vllm.whl.part* >PARTS.SHA256SUMS && echo "$wheel" >VLLM_WHEEL)
  rm -rf .whl_v*/
  mkdir -p .whl_v1
  : >"$dl/MANIFEST"
  # first the vllm parts (one per chunk at 50 MiB), then the other wheels, each into the current chunk while it fits
  for f in $(cd "$dl" && ls vllm.whl.part*; cd "$dl" && ls ./*.whl | sed 's|^\./||' | grep -v "^$wheel$"); do
    size=$(stat -c %s "$dl/$f")
    if [ $((used + size)) -gt "$CHUNK_BYTES" ] && [ "$used" -gt 0 ]; then
      chunk=$((chunk + 1))
      used=0
      mkdir -p ".whl_v$chunk"
    fi
    cp "$dl/$f" ".whl_v$chunk/"
    used=$((used + size))
    echo ".whl_v$chunk $f" >>"$dl/MANIFEST"
  done
  cp "$dl/MANIFEST" "$dl/SHA256SUMS" "$dl/PARTS.SHA256SUMS" "$dl/VLLM_WHEEL" .whl_v1/
  for f in .whl_v*/; do echo "${f%/}: $(ls "$f" | wc -l) files, $(mib "$(du -sb "$f" | cut -f1)")"; done
  echo "carry each chunk in one device call: bash benchmarks/gpu_peer.sh stage"
}

check_import() {
  local t0 t1
  t0=$(date +%s.%N)
  PYTHONPATH=$SITE VLLM_USE_FLASHINFER_SAMPLER=0 python3 -c \
    "import vllm, vllm.v1.engine.async_llm; print('vllm', vllm.__version__)"
  t1=$(date +%s.%N)
  echo "import check: $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
}

install() {
  local t0 t1 wheel missing whls
  t0=$(date +%s.%N)
  if [ -f "$DONE" ] && [ -d "$SITE/vllm-${VERSION}.dist-info" ]; then
    echo "vllm $VERSION already installed in $SITE; re-checking the import"
    check_import
    return
  fi
  stage
  if [ ! -f "$PARTS/MANIFEST" ] || [ ! -f "$PARTS/SHA256SUMS" ] || [ ! -f "$PARTS/VLLM_WHEEL" ]; then
    echo "install: chunk .whl_v1 is missing (MANIFEST/SHA256SUMS/VLLM_WHEEL not in $PARTS)" >&2
    exit 1
  fi
  missing=$(missing_chunks)
  if [ -n "$missing" ]; then
    echo "install: chunk(s) not staged yet: $missing(carry each in a device call and run 'stage')" >&2
    exit 1
  fi
  wheel=$(head -n1 "$PARTS/VLLM_WHEEL")
  if [ ! -f "$PARTS/$wheel" ]; then
    # the parts in MANIFEST order (part00, part01, ...)
    (cd "$PARTS" && awk '$2 ~ /^vllm\.whl\.part/ { print $2 }' MANIFEST | sort | xargs cat >"$wheel.tmp")
    mv "$PARTS/$wheel.tmp" "$PARTS/$wheel"
    echo "joined $wheel ($(mib "$(stat -c %s "$PARTS/$wheel")"))"
  fi
  if ! (cd "$PARTS" && sha256sum -c --quiet SHA256SUMS); then
    echo "install: SHA256SUMS do not match (files above); re-stage their chunks:" >&2
    (cd "$PARTS" && sha256sum -c SHA256SUMS 2>/dev/null | awk -F': ' '$2 != "OK" { print $1 }') |
      while read -r f; do
        case $f in
          "$wheel")
            rm -f "$PARTS/$wheel"
            echo "  $f (joined from the vllm parts; removed). Parts that differ:" >&2
            (cd "$PARTS" && sha256sum -c PARTS.SHA256SUMS 2>/dev/null | awk -F': ' '$2 != "OK" { print $1 }') |
              while read -r part; do
                echo "    $part (from $(awk -v f="$part" '$2 == f { print $1 }' "$PARTS/MANIFEST"))" >&2
              done
            ;;
          *) echo "  $f (from $(awk -v f="$f" '$2 == f { print $1 }' "$PARTS/MANIFEST"))" >&2 ;;
        esac
      done
    exit 1
  fi
  echo "SHA256SUMS ok ($(wc -l <"$PARTS/SHA256SUMS") wheels)"
  # exactly the wheels named in SHA256SUMS (nothing else that lies in $PARTS)
  whls=$(awk '{ print "'"$PARTS"'/" $2 }' "$PARTS/SHA256SUMS")
  if [ -e "$SITE" ]; then
    # a partial earlier install (no completion marker): start it afresh
    case $SITE in
      /tmp/?*) rm -rf "$SITE" ;;
      *) echo "install: $SITE exists without $DONE; remove it first" >&2; exit 1 ;;
    esac
  fi
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" $whls
  touch "$DONE"
  t1=$(date +%s.%N)
  echo "installed into $SITE in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
  check_import
}

case ${1:-} in
  build) build ;;
  stage) stage ;;
  install) install ;;
  *)
    echo "usage: bash benchmarks/vllm_gpu_setup.sh build|stage|install" >&2
    exit 2
    ;;
esac

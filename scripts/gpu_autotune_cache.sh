#!/usr/bin/env bash
# Carry Triton's autotune choices from one lent GPU machine to the next (each call may start
# a fresh machine, which would benchmark every kernel's candidate configs again: 60-200 s of
# an engine's start-up).
#
#   bash scripts/gpu_autotune_cache.sh load   # before the work: unpack .gpu/autotune_<GPU>.tgz
#   bash scripts/gpu_autotune_cache.sh save   # after it: $OUT/autotune_<GPU>.tgz
#
# Only the autotuner's timing files (`*.autotune.json`, written with `cache_results=True`,
# kernels/_autotune.py) travel, not compiled kernels. Triton keys each file by its own
# version, the GPU architecture, the kernel's source, the tuning key and the candidate
# configs, so a stale entry is never read for a changed kernel; the archive is named by the
# GPU model because an H100 and an H200 share the architecture key (sm_90) but not their
# best configs. Copy the saved archive into .gpu/ here and pass `.gpu` in the call's carry.
set -u
what=${1:?load or save}
dir=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr -c 'A-Za-z0-9\n' _)
[ -n "$gpu" ] || { echo "autotune cache: no GPU, nothing to $what"; exit 0; }
archive="autotune_${gpu}.tgz"
case $what in
load)
  if [ -f ".gpu/$archive" ]; then
    mkdir -p "$dir"
    tar xzf ".gpu/$archive" -C "$dir" && echo "autotune cache: $(tar tzf ".gpu/$archive" | grep -c autotune.json) choices loaded for $gpu"
  else
    echo "autotune cache: no .gpu/$archive, tuning from scratch"
  fi
  ;;
save)
  out=${OUT:?OUT must be set}
  if [ -d "$dir" ]; then
    (cd "$dir" && find . -name '*.autotune.json' | tar czf "$out/$archive" -T -)
    echo "autotune cache: $(tar tzf "$out/$archive" | grep -c autotune.json) choices saved to \$OUT/$archive"
  fi
  ;;
*) echo "usage: $0 load|save" >&2; exit 2 ;;
esac

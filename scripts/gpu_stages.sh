#!/usr/bin/env bash
# One device call on the lent GPU machine: build, then the named stages, each bounded in
# time so that a slow stage cannot take the whole call, and each leaving its record
# under $OUT even when cut off (pytest gets SIGINT first, so it still prints its summary;
# the tests run file by file with -v, and the cases a cut-off file did not finish are
# listed).
#
#   bash scripts/gpu_stages.sh tests:tests/decoding/test_generate.py:120 \
#        bench:bench/bench_generate.py:test_smollm2_shape_b1:150 \
#        script:knn_share:90:scripts/knn_decode_share.py --model random --sizes 1e6
#
# Stages: tests:FILE:SECONDS, bench:FILE:K_EXPR:SECONDS (K_EXPR as pytest -k; its JSON
# goes to $OUT/<file>_<n>.json and a table is printed), script:NAME:SECONDS:ARGS...
# (python -P with scripts/ and bench/ on PYTHONPATH; everything after the third colon
# is the command line).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_run_out}
mkdir -p "$OUT"
T0=$(date +%s)
# The machine's copy may carry a stale .git: without this, bench JSONs name its HEAD.
[ -n "${SENTINEL_GIT_COMMIT:-}" ] || echo "warning: SENTINEL_GIT_COMMIT unset; bench JSONs record the copy's git HEAD, which may be stale"
el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
if [ -z "${SKIP_BUILD:-}" ]; then  # SKIP_BUILD=1: an installed build (trying it out here)
  el build
  python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
  echo "build rc=$?"
fi
# Triton's autotune choices of an earlier call on this GPU model (scripts/gpu_autotune_cache.sh;
# NO_AUTOTUNE_CACHE=1: tune from scratch, e.g. to time a start-up)
[ -z "${NO_AUTOTUNE_CACHE:-}" ] && bash scripts/gpu_autotune_cache.sh load
n=0
for stage in "$@"; do
  n=$((n + 1))
  kind=${stage%%:*}
  rest=${stage#*:}
  case $kind in
    tests)
      file=${rest%%:*}; lim=${rest##*:}; name=$(basename "$file" .py)_$n
      el "tests $file (${lim}s)"
      python3 -P -m pytest "$file" -q --collect-only -p no:cacheprovider 2>/dev/null \
        | grep '::' | sort > "$OUT/$name.all"
      timeout -s INT -k 15 "$lim" python3 -P -m pytest "$file" -n 14 -v -p no:cacheprovider \
        -rfE > "$OUT/$name.log" 2>&1
      echo "  rc=$?"
      grep -oE '(PASSED|FAILED|SKIPPED|ERROR) tests/[^ ]+' "$OUT/$name.log" \
        | awk '{print $2}' | sort > "$OUT/$name.done"
      echo "  finished $(wc -l < "$OUT/$name.done") of $(wc -l < "$OUT/$name.all")"
      comm -23 "$OUT/$name.all" "$OUT/$name.done" | sed 's/^/  unfinished: /' | head -20
      grep -E '(FAILED|ERROR) tests/' "$OUT/$name.log" | sed 's/^/  /' | sort -u | head -20
      grep -E '^=+ .*(passed|failed)' "$OUT/$name.log" | tail -1
      ;;
    bench)
      file=${rest%%:*}; rest=${rest#*:}; kexpr=${rest%:*}; lim=${rest##*:}
      name=$(basename "$file" .py)_$n
      el "bench $file -k '$kexpr' (${lim}s)"
      timeout -s INT -k 15 "$lim" python3 -P -m pytest "$file" -k "$kexpr" -p no:cacheprovider \
        --benchmark-columns=median,rounds --benchmark-sort=name \
        --benchmark-json="$OUT/$name.json" > "$OUT/$name.log" 2>&1
      echo "  rc=$?"
      grep -E '^=+ .*(passed|failed)|Error' "$OUT/$name.log" | tail -3
      python3 - "$OUT/$name.json" <<'PY'
import json, sys
try:
    benchmarks = json.load(open(sys.argv[1]))["benchmarks"]
except Exception as e:  # noqa: BLE001 (a cut-off bench leaves no JSON)
    # bench/conftest.py also writes each finished entry to <json>.partial.jsonl
    try:
        benchmarks = [json.loads(line) for line in open(sys.argv[1] + ".partial.jsonl")]
        print(f"  no json ({e}); {len(benchmarks)} finished entries from .partial.jsonl")
    except OSError:
        print("  no json:", e)
        raise SystemExit
for b in sorted(benchmarks, key=lambda b: (b["group"] or "", b["name"])):
    x = b["extra_info"]
    tps = x.get("tokens_per_s")
    extra = f" {tps:8.0f} tok/s" if tps else ""
    kpl = x.get("step_kernels_per_layer")
    extra += f" k/l={kpl:.2f}" if kpl else ""
    print(f"  {str(b['group']):26s} {b['name'][-46:]:46s} {b['stats']['median'] * 1e3:9.3f} ms{extra}")
PY
      ;;
    script)
      name=${rest%%:*}; rest=${rest#*:}; lim=${rest%%:*}; cmd=${rest#*:}
      el "script $name (${lim}s): $cmd"
      # shellcheck disable=SC2086
      PYTHONPATH=scripts:bench timeout -s INT -k 15 "$lim" python3 -P $cmd \
        > "$OUT/${name}_$n.log" 2>&1
      echo "  rc=$?"
      tail -8 "$OUT/${name}_$n.log" | sed 's/^/  /'
      ;;
    *)
      echo "unknown stage $stage"
      ;;
  esac
done
[ -z "${NO_AUTOTUNE_CACHE:-}" ] && OUT="$OUT" bash scripts/gpu_autotune_cache.sh save
el done

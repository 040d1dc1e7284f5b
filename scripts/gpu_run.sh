#!/usr/bin/env bash
# One call on the lent GPU machine: build, test, benchmark, report.
#
#   OUT=/some/folder bash scripts/gpu_run.sh        # from the repo root; OUT defaults to ./out
#
# Optional environment:
#   SENTINEL_GIT_COMMIT  commit id recorded in the benchmark JSON (the machine gets a copy of
#                        the working tree without .git), e.g. "$(git rev-parse HEAD)" computed
#                        where the call is made.
#   BENCH_FILES          benchmark files to run (default: bench/bench_quantize.py).
#   BENCH_ARGS           extra pytest arguments for the benchmark run (e.g. "-k cuda").
#   TEST_ARGS            extra pytest arguments for the test run.
#   SKIP_TESTS=1         go straight to the benchmarks.
#
# What comes back in $OUT (7 files, flat, logs trimmed to their last 200 KB):
#   build.log  env.log  tests.log  bench.log  bench_gpu.json  report.md  report.png
# Every step runs even when an earlier one failed (a failed build still shows its log and
# the import error); the exit code of each is printed at the end, and the script exits
# non-zero when any step failed.

set -u
set -o pipefail
export PYTHONUNBUFFERED=1

OUT="${OUT:-./out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
MAX_LOG_BYTES=200000

declare -a STEP_NAMES=()
declare -a STEP_CODES=()

record() {  # record NAME CODE
    STEP_NAMES+=("$1")
    STEP_CODES+=("$2")
    echo ">>> $1: exit $2"
}

trim() {  # keep the last MAX_LOG_BYTES of a log
    local f="$1"
    if [ -f "$f" ] && [ "$(wc -c <"$f")" -gt "$MAX_LOG_BYTES" ]; then
        { echo "[... trimmed to the last $MAX_LOG_BYTES bytes ...]"; tail -c "$MAX_LOG_BYTES" "$f"; } >"$f.tmp"
        mv "$f.tmp" "$f"
    fi
}

echo "=== sentinel-kernels GPU run $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(pwd), OUT=$OUT"

# 1. build the C++ extension for this machine's Python and install the package (editable)
echo "=== build"
"$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
record build $?
tail -n 5 "$OUT/build.log"
trim "$OUT/build.log"

# 2. environment: the extension imports, the CLI describes the machine
echo "=== env"
{
    echo "\$ nvidia-smi"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
        --format=csv 2>&1
    echo "\$ $PY -c 'import sentinel_kernels._C'"
    "$PY" -c "import sentinel_kernels._C as C; print('ok', C.__file__); \
print('simd_level', getattr(C, 'simd_level', lambda: '?')())"
    echo "exit $?" | tee "$OUT/.import_rc"
    echo "\$ sentinel-kernels info"
    if command -v sentinel-kernels >/dev/null; then
        sentinel-kernels info
    else  # scripts folder not on PATH
        "$PY" -c "import sys; from sentinel_kernels.app.cli import main; \
sys.argv = ['sentinel-kernels', 'info']; sys.exit(main())"
    fi
    echo "exit $?" | tee "$OUT/.info_rc"
} >"$OUT/env.log" 2>&1
record "import _C" "$(sed 's/exit //' "$OUT/.import_rc" 2>/dev/null || echo 1)"
record "sentinel-kernels info" "$(sed 's/exit //' "$OUT/.info_rc" 2>/dev/null || echo 1)"
rm -f "$OUT/.import_rc" "$OUT/.info_rc"
cat "$OUT/env.log"
trim "$OUT/env.log"

# 3. tests (not the real-model ones); keep going to the benchmarks whatever happens
# -P: the checkout (and its top-level kernels/) stays off sys.path (kernels/README.md).
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    echo "=== tests"
    # shellcheck disable=SC2086
    "$PY" -P -m pytest tests -x -q -m "not model" -p no:cacheprovider ${TEST_ARGS:-} 2>&1 \
        | tee "$OUT/tests.log" | tail -n 40
    record tests $?
    trim "$OUT/tests.log"
fi

# 4. benchmarks
echo "=== benchmarks"
# shellcheck disable=SC2086
"$PY" -P -m pytest ${BENCH_FILES:-bench/bench_quantize.py} -p no:cacheprovider \
    --benchmark-json="$OUT/bench_gpu.json" \
    --benchmark-columns=median,iqr,rounds,iterations --benchmark-sort=name \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -n 80
record benchmarks $?
trim "$OUT/bench.log"

# 5. report
echo "=== report"
if [ -s "$OUT/bench_gpu.json" ]; then
    "$PY" -m sentinel_kernels.app.bench_report "$OUT/bench_gpu.json" --out "$OUT" \
        --stem report
    record report $?
else
    echo "no benchmark JSON"
    record report 1
fi

# summary
echo "=== summary"
status=0
for i in "${!STEP_NAMES[@]}"; do
    printf '%-24s exit %s\n' "${STEP_NAMES[$i]}" "${STEP_CODES[$i]}"
    [ "${STEP_CODES[$i]}" = "0" ] || status=1
done
ls -la "$OUT"
exit "$status"

#!/usr/bin/env bash
# Serving comparison (issue 17, GPU proof): `sentinel-kernels bench-serve` against our
# server (`sentinel-kernels serve`, SmolLM2, levels 2 and 1) and against
# `transformers serve --continuous-batching` on the same machine and model, at several
# request rates, inside one time budget.
#
#   OUT=/some/folder SENTINEL_GIT_COMMIT=abc1234 bash scripts/serve_compare.sh   # repo root
#
# Steps (all bounded by BUDGET_S, counted from the start of this script):
#   1. wheels: installs those of $WHEELS_DIR (fastapi, uvicorn, pydantic, openai, gguf, ...)
#      that this Python lacks, or has older, into $SITE (pip --no-index --no-deps --target)
#      and puts $SITE first on PYTHONPATH; wheels for another Python are left out;
#   2. the package: `pip install --no-build-isolation --no-deps -e .` unless sentinel_kernels
#      (with its kernels) already imports;
#   3. the model: the SmolLM2 GGUF in $SENTINEL_SMOLLM2_DIR (default $HOME/m; assembled from
#      smol.aa there and .gpu/b/smol.ab when only the parts are present); for the peer it is
#      saved once as a transformers folder ($PEER_MODEL_DIR, bf16, same weights as our
#      server loads, generation_config.eos_token_id = -1: the peer's form of `ignore_eos`,
#      which bench-serve sends and our server honours, so both generate exactly OUTPUT_LEN
#      tokens per request);
#   4. the runs of $PLAN in order. A server starts when its first run comes (ours at level 2
#      and the peer at once: the peer loads while ours captures its graphs; the peer gets one
#      warm-up request after ours is healthy) and stops after its last run. Before every
#      run each server gets the same short warm-up request (not measured). A run whose
#      arrivals alone (NUM_PROMPTS / rate) do not fit in what is left is skipped and named;
#      bench-serve's per-request --timeout is cut so that it always ends (and writes its
#      results) before the budget, and `timeout` bounds it as well.
#   5. two files in $OUT (the device machine sends back at most 8; on cuda a third, the
#      autotune choices autotune_<GPU>.tgz): serve_compare.json
#      (every run's config and summary, device, versions, commit, skipped runs, start-up
#      times; a summary table goes to stdout) and serve_runs.tar.gz (serve_runs/
#      serve_<server>_<rate>/ with bench-serve's results.json (per-request records),
#      summary.md and latency.png when matplotlib is there, and serve_runs/logs/: server,
#      bench-serve, wheel, build and model-save logs).
#   `python3 scripts/serve_compare_report.py $OUT/serve_compare.json` prints the ratios
#   against the peer and the issue's targets.
#
# Environment (defaults in brackets):
#   OUT [./out]  BUDGET_S [520]  SENTINEL_GIT_COMMIT [unknown]
#   PY [python3]: our server, bench-serve, the model save;  PEER_PY [$PY]: transformers serve
#   MODEL_SPEC [smollm2]: our server's --model (tiny:llama for a dry run)
#   DEVICE [cuda]: cpu for a dry run;  DTYPE [bfloat16 on cuda, float32 on cpu]
#   NUM_PROMPTS [500]  INPUT_LEN [200 words, about 200 tokens + the chat template's ~30]
#   OUTPUT_LEN [128]  ENDPOINT [chat]  SEED [0]
#   PLAN ["ours2:inf ours2:4 peer:inf peer:4 ours2:16 ours2:64 peer:16 peer:64
#         ours1:inf ours1:4 ours1:16 ours1:64"]: runs in order, SERVER:RATE with SERVER one
#         of ours1, ours2 (our server at that level; ours0 and ours3 work too), ours1p,
#         ours2p (the same with --engine-process), ours1w4, ours2w4 (with --http-workers 4,
#         any count) and peer; a suffix fN (ours1w4f4) adds --max-prefill-forwards N
#   NUM_PROMPTS_<rate> (e.g. NUM_PROMPTS_4=200): a per-rate override of NUM_PROMPTS
#   MAX_BATCH [64]  MAX_QUEUED [2048]  MAX_SEQ_LEN [1024]  OURS_LOG_LEVEL [info]
#   CLIENT_PROCESSES [4]: bench-serve's --client-processes for every run (RATE/cN in PLAN,
#         e.g. ours1w4:inf/c1, sets it for that run: an A/B on one server) (one client
#         process reads at most ~25k streamed chunks/s on a 2-core box, less than our
#         server streams at rate inf; before 2026-12-06 every run used one)
#   OURS_EXTRA_ARGS, PEER_EXTRA_ARGS, BENCH_EXTRA_ARGS: appended to the commands
#   PEER_MODEL_DIR [/tmp/smol_hf]: saved when it has no config.json
#   WHEELS_DIR [.gpu/wheels]  SITE [/tmp/site]  BUILD [auto|1|0]
#   NO_AUTOTUNE_CACHE: set, the Triton autotune choices are neither loaded from
#         .gpu/autotune_<GPU>.tgz nor saved to $OUT (scripts/gpu_autotune_cache.sh)
#   HEALTH_WAIT_S [300]: longest wait for a server's /health 200
#   RESERVE_S [20]: budget kept for stopping servers and writing the summary

set -u
set -o pipefail
export PYTHONUNBUFFERED=1

T_START=$(date +%s)
OUT="${OUT:-./out}"
BUDGET_S="${BUDGET_S:-520}"
PY="${PY:-python3}"
PEER_PY="${PEER_PY:-$PY}"
MODEL_SPEC="${MODEL_SPEC:-smollm2}"
DEVICE="${DEVICE:-cuda}"
if [ "$DEVICE" = cpu ]; then DTYPE="${DTYPE:-float32}"; else DTYPE="${DTYPE:-bfloat16}"; fi
case "$DEVICE" in cuda) PEER_DEVICE="cuda:0" ;; *) PEER_DEVICE="$DEVICE" ;; esac
NUM_PROMPTS="${NUM_PROMPTS:-500}"
INPUT_LEN="${INPUT_LEN:-200}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
ENDPOINT="${ENDPOINT:-chat}"
SEED="${SEED:-0}"
PLAN="${PLAN:-ours2:inf ours2:4 peer:inf peer:4 ours2:16 ours2:64 peer:16 peer:64 ours1:inf ours1:4 ours1:16 ours1:64}"
MAX_BATCH="${MAX_BATCH:-64}"
MAX_QUEUED="${MAX_QUEUED:-2048}"
MAX_SEQ_LEN="${MAX_SEQ_LEN:-1024}"
OURS_LOG_LEVEL="${OURS_LOG_LEVEL:-info}"
OURS_EXTRA_ARGS="${OURS_EXTRA_ARGS:-}"
PEER_EXTRA_ARGS="${PEER_EXTRA_ARGS:-}"
BENCH_EXTRA_ARGS="${BENCH_EXTRA_ARGS:-}"
CLIENT_PROCESSES="${CLIENT_PROCESSES:-4}"
PEER_MODEL_DIR="${PEER_MODEL_DIR:-/tmp/smol_hf}"
WHEELS_DIR="${WHEELS_DIR:-.gpu/wheels}"
SITE="${SITE:-/tmp/site}"
BUILD="${BUILD:-auto}"
HEALTH_WAIT_S="${HEALTH_WAIT_S:-300}"
RESERVE_S="${RESERVE_S:-20}"
export SENTINEL_SMOLLM2_DIR="${SENTINEL_SMOLLM2_DIR:-$HOME/m}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_UPDATE_CHECK=1
export TOKENIZERS_PARALLELISM=false

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d /tmp/serve_compare.XXXXXX)"
# Everything but the combined JSON goes into RUNDIR (packed into $OUT/serve_runs.tar.gz at the
# end): the device machine sends back at most 8 files of $OUT.
RUNDIR="$WORK/serve_runs"
mkdir -p "$RUNDIR/logs"
RUNS_TSV="$WORK/runs.tsv"      # server, level, rate, num_prompts, dir, rc, wall_s
SKIPPED_TSV="$WORK/skipped.tsv" # server, rate, reason
STARTS_TSV="$WORK/starts.tsv"  # server, startup_s, status
: >"$RUNS_TSV"
: >"$SKIPPED_TSV"
: >"$STARTS_TSV"

elapsed() { echo $(($(date +%s) - T_START)); }
left() { echo $((BUDGET_S - $(date +%s) + T_START)); }
log() { echo "[serve_compare +$(elapsed)s] $*"; }

echo "=== serve_compare $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(pwd); OUT=$OUT BUDGET_S=$BUDGET_S"
echo "    MODEL_SPEC=$MODEL_SPEC DEVICE=$DEVICE DTYPE=$DTYPE NUM_PROMPTS=$NUM_PROMPTS" \
    "INPUT_LEN=$INPUT_LEN OUTPUT_LEN=$OUTPUT_LEN ENDPOINT=$ENDPOINT"
echo "    PLAN=$PLAN"

# ---------------------------------------------------------------------------------------
# 1. wheels
# ---------------------------------------------------------------------------------------
if [ -d "$WHEELS_DIR" ]; then
    # Which wheels to install: compatible with this Python, and the distribution missing
    # here; typing-extensions and anyio also when the installed one is older (pydantic and
    # openai need recent ones); nothing installed is ever shadowed by an older version.
    mapfile -t WANT < <(PYTHONPATH='' "$PY" - "$WHEELS_DIR" <<'EOF'
import importlib.metadata as md
import pathlib
import sys

from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename
from packaging.version import Version

supported = set(sys_tags())
upgrade = {"typing-extensions", "anyio"}
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(whl.name)
    if not supported & set(tags):
        continue
    try:
        have = Version(md.version(name))
    except md.PackageNotFoundError:
        have = None
    if have is None or (name in upgrade and have < version):
        print(whl)
        print(f"    wheel {whl.name}: installed {have or 'no'}", file=sys.stderr)
EOF
    )
    rm -rf "$SITE"
    mkdir -p "$SITE"
    if [ "${#WANT[@]}" -gt 0 ]; then
        "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${WANT[@]}" \
            >"$RUNDIR/logs/wheels.log" 2>&1
        log "installed ${#WANT[@]} wheel(s) into $SITE (exit $?)"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    log "no $WHEELS_DIR: nothing installed"
fi

# ---------------------------------------------------------------------------------------
# 2. the package
# ---------------------------------------------------------------------------------------
if [ "$BUILD" = 1 ] || { [ "$BUILD" = auto ] &&
    ! "$PY" -c "import sentinel_kernels, sentinel_kernels.kernels" >/dev/null 2>&1; }; then
    log "building the package (pip install -e .)"
    "$PY" -m pip install --no-build-isolation --no-deps -e . >"$RUNDIR/logs/build.log" 2>&1
    log "build exit $?"
    tail -n 3 "$RUNDIR/logs/build.log"
fi
"$PY" -c "import fastapi, uvicorn, pydantic, sentinel_kernels; print('imports ok:', \
'fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'pydantic', pydantic.__version__)" ||
    log "WARNING: our server's imports fail (see above)"
# Triton's autotune choices of an earlier call on this GPU model (.gpu/autotune_<GPU>.tgz,
# scripts/gpu_autotune_cache.sh): the servers' start-ups skip their benchmarks
if [ "$DEVICE" = cuda ] && [ -z "${NO_AUTOTUNE_CACHE:-}" ]; then
    bash scripts/gpu_autotune_cache.sh load
fi
if ! "$PY" -c "import matplotlib" >/dev/null 2>&1; then
    log "no matplotlib: bench-serve runs without its latency.png"
fi

# bench-serve through a small launcher: without matplotlib the PNG is skipped instead of
# failing the run. (The peer refuses the `ignore_eos` field, HTTP 422 "Unexpected fields":
# its runs pass --no-ignore-eos, and the saved peer model ignores EOS instead, step 3.)
cat >"$WORK/bench.py" <<'EOF'
import sys

from sentinel_kernels.app import bench_serve as bs

try:
    import matplotlib  # noqa: F401
except ImportError:
    bs.write_png = lambda path, *a, **k: print(f"no {path}: matplotlib is not installed")
from sentinel_kernels.app.cli import main

if __name__ == "__main__":  # --client-processes spawns processes that import this file
    sys.exit(main(["bench-serve", *sys.argv[1:]]))
EOF

# ---------------------------------------------------------------------------------------
# 3. the model
# ---------------------------------------------------------------------------------------
needs_smollm2=0
[ "$MODEL_SPEC" = smollm2 ] && needs_smollm2=1
case " $PLAN " in *" peer:"*) [ -f "$PEER_MODEL_DIR/config.json" ] || needs_smollm2=1 ;; esac
if [ "$needs_smollm2" = 1 ] && ! ls "$SENTINEL_SMOLLM2_DIR"/*.gguf >/dev/null 2>&1; then
    if [ -f "$SENTINEL_SMOLLM2_DIR/smol.aa" ] && [ -f .gpu/b/smol.ab ]; then
        cat "$SENTINEL_SMOLLM2_DIR/smol.aa" .gpu/b/smol.ab \
            >"$SENTINEL_SMOLLM2_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
        log "assembled the GGUF in $SENTINEL_SMOLLM2_DIR"
    else
        log "WARNING: no .gguf in SENTINEL_SMOLLM2_DIR=$SENTINEL_SMOLLM2_DIR"
    fi
fi

# ---------------------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------------------
declare -A PID=() PORT=() STARTED_AT=() HEALTHY=() MODEL_NAME=() THR=()
SAVE_PID=""

free_port() {
    "$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}

save_peer_model() {  # in the background; waited for before the peer starts
    if [ -f "$PEER_MODEL_DIR/config.json" ]; then
        log "peer model folder $PEER_MODEL_DIR exists"
        return
    fi
    log "saving SmolLM2 as a transformers folder in $PEER_MODEL_DIR (background)"
    PEER_MODEL_DIR="$PEER_MODEL_DIR" "$PEER_PY" - >"$RUNDIR/logs/save_peer_model.log" 2>&1 <<'EOF' &
import copy
import os
import time

import torch
from transformers import AutoModelForCausalLM

from sentinel_kernels.models import load_smollm2

t0 = time.perf_counter()
dst = os.environ["PEER_MODEL_DIR"]
model, tok = load_smollm2(dtype=torch.bfloat16)
# The GGUF load marks the model quantized (GgufConfig), which save_pretrained refuses; its
# tensors are plain de-quantised bf16, so they go into a plain model of the same config.
cfg = copy.deepcopy(model.config)
if hasattr(cfg, "quantization_config"):
    del cfg.quantization_config
plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
plain.load_state_dict(model.state_dict(), strict=True)
plain.generation_config = copy.deepcopy(model.generation_config)
# bench-serve asks for ignore_eos, which transformers serve refuses: an EOS id no token has
# makes its continuous batching generate max_tokens tokens, as our server does.
plain.generation_config.eos_token_id = -1
tmp = dst + ".tmp"
plain.save_pretrained(tmp)
tok.save_pretrained(tmp)
os.replace(tmp, dst)
print(f"saved {dst} in {time.perf_counter() - t0:.1f} s")
EOF
    SAVE_PID=$!
}

start_server() {  # start_server NAME (ours1, ours2, peer): in the background, no wait
    local name="$1" port
    port=$(free_port)
    PORT[$name]=$port
    STARTED_AT[$name]=$(date +%s)
    HEALTHY[$name]=0
    if [ "$name" = peer ]; then
        if [ -n "$SAVE_PID" ]; then
            wait "$SAVE_PID"
            log "peer model save exit $? ($(tail -n 1 "$RUNDIR/logs/save_peer_model.log"))"
            SAVE_PID=""
            STARTED_AT[$name]=$(date +%s)
        fi
        if [ ! -f "$PEER_MODEL_DIR/config.json" ]; then
            log "no peer model folder $PEER_MODEL_DIR: the peer cannot start"
            HEALTHY[$name]=-1
            echo -e "$name\t0\tno model folder (see logs/save_peer_model.log)" >>"$STARTS_TSV"
            return 1
        fi
        MODEL_NAME[$name]="$PEER_MODEL_DIR"
        # shellcheck disable=SC2086
        setsid "$PEER_PY" -m transformers.cli.transformers serve --continuous-batching \
            --device "$PEER_DEVICE" --dtype "$DTYPE" --host 127.0.0.1 --port "$port" \
            --log-level warning $PEER_EXTRA_ARGS "$PEER_MODEL_DIR" \
            >"$RUNDIR/logs/server_peer.log" 2>&1 &
    else
        local level="${name:4:1}" split="" base="$name" forwards=""
        if [[ "$name" == *f* ]]; then  # ...fN: --max-prefill-forwards N
            base="${name%f*}" forwards="--max-prefill-forwards ${name##*f}"
        fi
        case "$base" in
        *p) split="--engine-process" ;;
        *w*) split="--http-workers ${base#*w}" ;;
        esac
        MODEL_NAME[$name]="$MODEL_SPEC"
        # shellcheck disable=SC2086
        setsid "$PY" -m sentinel_kernels.app.cli serve --model "$MODEL_SPEC" --level "$level" \
            --host 127.0.0.1 --port "$port" --device "$DEVICE" --dtype "$DTYPE" \
            --max-batch-size "$MAX_BATCH" --max-queued "$MAX_QUEUED" \
            --max-seq-len "$MAX_SEQ_LEN" --result-cache-size 0 --log-level "$OURS_LOG_LEVEL" \
            $split $forwards $OURS_EXTRA_ARGS >"$RUNDIR/logs/server_$name.log" 2>&1 &
    fi
    PID[$name]=$!
    log "started $name (pid ${PID[$name]}, port $port)"
}

# Wait for GET /health 200 (bounded), then one warm-up chat request (8 tokens, streamed).
wait_ready() {  # wait_ready NAME -> 0 when ready
    local name="$1" limit rc
    [ "${HEALTHY[$name]:-0}" = 1 ] && return 0
    limit=$(($(left) - RESERVE_S))
    [ "$limit" -gt "$HEALTH_WAIT_S" ] && limit=$HEALTH_WAIT_S
    if [ "$limit" -le 0 ]; then
        echo -e "$name\t0\tno budget left to wait" >>"$STARTS_TSV"
        return 1
    fi
    "$PY" - "${PORT[$name]}" "${PID[$name]}" "$limit" "${MODEL_NAME[$name]}" <<'EOF'
import json
import os
import sys
import time
import urllib.request

port, pid, limit, model = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + limit
while True:
    try:
        os.kill(pid, 0)
    except OSError:
        print(f"server pid {pid} exited before it was healthy")
        sys.exit(1)
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as resp:
            if resp.status == 200:
                break
    except Exception:
        pass
    if time.monotonic() > deadline:
        print(f"no /health 200 within {limit:.0f} s")
        sys.exit(1)
    time.sleep(0.5)
body = {
    "model": model,
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 8,
    "temperature": 0.0,
    "stream": True,
}
req = urllib.request.Request(
    base + "/v1/chat/completions",
    data=json.dumps(body).encode(),
    headers={"Content-Type": "application/json"},
)
t = time.perf_counter()
try:
    with urllib.request.urlopen(req, timeout=max(5.0, deadline - time.monotonic())) as resp:
        resp.read()
    print(f"warm-up request: {time.perf_counter() - t:.2f} s")
except Exception as exc:
    print(f"warm-up request failed: {type(exc).__name__}: {exc}")
    sys.exit(1)
EOF
    rc=$?
    local took=$(($(date +%s) - STARTED_AT[$name]))
    if [ "$rc" = 0 ]; then
        HEALTHY[$name]=1
        echo -e "$name\t$took\tready" >>"$STARTS_TSV"
        log "$name ready after ${took}s"
        return 0
    fi
    HEALTHY[$name]=-1
    echo -e "$name\t$took\tfailed (see logs/server_$name.log)" >>"$STARTS_TSV"
    log "$name did not become ready; last lines of its log:"
    tail -n 15 "$RUNDIR/logs/server_$name.log"
    return 1
}

stop_server() {  # stop_server NAME: SIGINT to its process group, then SIGKILL after 8 s
    local name="$1" pid="${PID[$1]:-}"
    [ -z "$pid" ] && return
    kill -INT -- "-$pid" 2>/dev/null
    for _ in $(seq 16); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL -- "-$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    unset "PID[$name]"
    log "stopped $name"
}

cleanup() {
    for name in "${!PID[@]}"; do stop_server "$name"; done
    [ -n "$SAVE_PID" ] && kill "$SAVE_PID" 2>/dev/null
}
pack() {  # $OUT/serve_runs.tar.gz: every run's bench-serve files and the logs (< 16 MiB)
    local tgz="$OUT/serve_runs.tar.gz"
    tar -czf "$tgz" -C "$WORK" serve_runs
    if [ "$(wc -c <"$tgz")" -gt 16000000 ]; then
        log "serve_runs.tar.gz over 16 MB: packed again without the per-request results.json"
        tar -czf "$tgz" -C "$WORK" --exclude=results.json serve_runs
    fi
    log "wrote $tgz ($(du -h "$tgz" | cut -f1))"
    if [ "$DEVICE" = cuda ] && [ -z "${NO_AUTOTUNE_CACHE:-}" ]; then
        OUT="$OUT" bash scripts/gpu_autotune_cache.sh save
    fi
}
trap 'cleanup; pack' EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------
# 4. the runs
# ---------------------------------------------------------------------------------------
read -r -a RUNS <<<"$PLAN"
last_use() {  # index of the last run of server $1 in RUNS
    local i last=-1
    for i in "${!RUNS[@]}"; do [ "${RUNS[$i]%%:*}" = "$1" ] && last=$i; done
    echo "$last"
}
skip() { echo -e "$1\t$2\t$3" >>"$SKIPPED_TSV"; log "SKIP $1 at rate $2: $3"; }

case " $PLAN " in *" peer:"*) save_peer_model ;; esac

for i in "${!RUNS[@]}"; do
    server="${RUNS[$i]%%:*}"
    rate="${RUNS[$i]#*:}"
    # RATE/cN: this run with N client processes (an A/B on one warm server)
    clients="$CLIENT_PROCESSES" tag="$rate"
    if [[ "$rate" == */c* ]]; then
        clients="${rate#*/c}" rate="${rate%%/c*}" tag="${rate}_c${clients}"
    fi
    case "${server%f[1-9]}" in ours[0-3] | ours[0-3]p | ours[0-3]w[1-9] | ours[0-3]w[1-9][0-9] | peer) ;; *)
        skip "$server" "$rate" "unknown server (ours0..ours3 [p|wN][fN] or peer)"
        continue
        ;;
    esac
    var="NUM_PROMPTS_${rate//./_}"
    n="${!var:-$NUM_PROMPTS}"
    # a run takes at least n / rate s (the arrivals) and, once this server's rate-inf
    # throughput is known, n * OUTPUT_LEN / that (its decoding); a start-up needs ~60 s more
    need=$("$PY" -c "import math; r = float('$rate'); thr = float('${THR[$server]:-0}'); \
a = $n / r if math.isfinite(r) else 0; d = $n * $OUTPUT_LEN / thr if thr > 0 else 0; \
print(math.ceil(1.1 * max(a, d) + 10))")
    [ -z "${PID[$server]:-}" ] && need=$((need + 60))
    if [ "$(left)" -lt $((need + RESERVE_S)) ]; then
        skip "$server" "$rate" "budget: ${need}s needed, $(($(left) - RESERVE_S))s left"
        continue
    fi
    if [ "${HEALTHY[$server]:-0}" = -1 ]; then
        skip "$server" "$rate" "the server did not start"
        [ -n "${PID[$server]:-}" ] && stop_server "$server"
        continue
    fi
    if [ -z "${PID[$server]:-}" ]; then
        if ! start_server "$server"; then
            skip "$server" "$rate" "the server did not start"
            continue
        fi
        # ours at level 2 and the peer start together: the peer's load overlaps ours' start-up
        if [ "$server" != peer ] && [ -z "${PID[peer]:-}" ] && [ "$(last_use peer)" -gt "$i" ] &&
            [ "${HEALTHY[peer]:-0}" = 0 ]; then
            start_server peer
        fi
    fi
    if ! wait_ready "$server"; then
        skip "$server" "$rate" "the server did not start"
        stop_server "$server"
        continue
    fi
    # another server that is up and not yet warm (the peer started with ours): warm it now
    for other in "${!PID[@]}"; do
        [ "$other" != "$server" ] && [ "${HEALTHY[$other]:-0}" = 0 ] && wait_ready "$other"
    done
    # a plan may repeat a run (variance): each repeat keeps its own folder
    dir="$RUNDIR/serve_${server}_${tag}"
    rep=2
    while [ -e "$dir" ]; do dir="$RUNDIR/serve_${server}_${tag}_run${rep}"; rep=$((rep + 1)); done
    blog="$WORK/bench_$(basename "$dir" | sed 's/^serve_//').log"
    # per-request timeout: every request has arrived after n / rate s; each then has at most
    # `tmo` s, so bench-serve ends (and writes its results) inside the budget
    tmo=$("$PY" -c "import math; r = float('$rate'); a = $n / r if math.isfinite(r) else 0; print(max(5, min(600, int($(left) - $RESERVE_S - a - 15))))")
    hard=$(($(left) - RESERVE_S))
    drop=0
    [ "$server" = peer ] && drop=1
    level=""
    [ "$server" != peer ] && level="${server:4:1}"
    log "RUN $server rate $rate: $n prompts, $clients client processes, request timeout ${tmo}s, hard limit ${hard}s"
    t0=$(date +%s)
    # shellcheck disable=SC2086
    timeout -k 5 "$hard" "$PY" "$WORK/bench.py" \
        --base-url "http://127.0.0.1:${PORT[$server]}" --endpoint "$ENDPOINT" \
        --model "${MODEL_NAME[$server]}" --num-prompts "$n" --request-rate "$rate" \
        --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --seed "$SEED" \
        --client-processes "$clients" $([ "$drop" = 1 ] && echo --no-ignore-eos) \
        --timeout "$tmo" --out "$dir" --disable-tqdm $BENCH_EXTRA_ARGS \
        >"$blog" 2>&1
    rc=$?
    wall=$(($(date +%s) - t0))
    grep -E "successful|failed requests|output token throughput|^\| (TTFT|TPOT|to headers) " \
        "$blog" | sed 's/^/    /'
    [ "$rc" != 0 ] && tail -n 5 "$blog" | sed 's/^/    /'
    cp "$blog" "$RUNDIR/logs/" 2>/dev/null
    echo -e "$server\t$level\t$rate\t$n\t$dir\t$rc\t$wall" >>"$RUNS_TSV"
    if [ "$rate" = inf ] && [ -f "$dir/results.json" ]; then
        THR[$server]=$("$PY" -c "import json, sys; \
print(json.load(open(sys.argv[1]))['summary']['output_throughput'])" "$dir/results.json")
    fi
    log "END $server rate $rate: exit $rc in ${wall}s"
    # stop a server after its last run (frees the GPU for the next one)
    [ "$(last_use "$server")" = "$i" ] && stop_server "$server"
done

cleanup
trap - EXIT

# ---------------------------------------------------------------------------------------
# 5. the summary
# ---------------------------------------------------------------------------------------
for f in "$RUNDIR"/logs/server_*.log; do  # keep the logs' last 2 MB
    [ -f "$f" ] && [ "$(wc -c <"$f")" -gt 2000000 ] && tail -c 2000000 "$f" >"$f.tmp" && mv "$f.tmp" "$f"
done
export MODEL_SPEC PEER_MODEL_DIR DEVICE DTYPE NUM_PROMPTS INPUT_LEN OUTPUT_LEN ENDPOINT SEED \
    MAX_BATCH MAX_QUEUED MAX_SEQ_LEN OURS_EXTRA_ARGS PEER_EXTRA_ARGS BENCH_EXTRA_ARGS PLAN BUDGET_S \
    CLIENT_PROCESSES
"$PY" - "$OUT" "$RUNS_TSV" "$SKIPPED_TSV" "$STARTS_TSV" "$RUNDIR" <<'EOF'
import datetime
import importlib.metadata as md
import json
import os
import pathlib
import platform
import sys

out, runs_tsv, skipped_tsv, starts_tsv, runs_root = map(pathlib.Path, sys.argv[1:6])


def rows(path):
    text = path.read_text(encoding="utf-8")
    return [line.split("\t") for line in text.splitlines() if line.strip()]


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


device = "cpu"
try:
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
except Exception as exc:
    device = f"unknown ({type(exc).__name__})"

runs = []
for server, level, rate, n, run_dir, rc, wall in rows(runs_tsv):
    entry = {
        "server": "sentinel-kernels serve" if server != "peer" else "transformers serve --continuous-batching",
        "key": server,
        "level": int(level) if level else None,
        "rate": rate,
        "num_prompts": int(n),
        "dir": "serve_runs.tar.gz:" + os.path.relpath(run_dir, runs_root),
        "exit": int(rc),
        "wall_s": int(wall),
    }
    res = pathlib.Path(run_dir) / "results.json"
    if res.is_file():
        data = json.loads(res.read_text(encoding="utf-8"))
        entry["config"] = data["config"]
        entry["summary"] = data["summary"]
        tok_src = {r.get("output_tokens_source") for r in data["requests"] if r.get("success")}
        entry["output_tokens_source"] = sorted(s for s in tok_src if s)
    else:
        entry["summary"] = None
    runs.append(entry)

doc = {
    "what": "bench-serve: our server vs transformers serve --continuous-batching (issue 17)",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "git_commit": os.environ.get("SENTINEL_GIT_COMMIT", "unknown"),
    "device": device,
    "host": platform.node(),
    "python": platform.python_version(),
    "versions": {
        k: version(k)
        for k in (
            "torch", "triton", "transformers", "sentinel-kernels", "fastapi", "uvicorn",
            "starlette", "pydantic", "openai", "httpx", "uvloop",
        )
    },
    "settings": {
        **{
            k.lower(): os.environ[k]
            for k in (
                "MODEL_SPEC", "PEER_MODEL_DIR", "DEVICE", "DTYPE", "ENDPOINT", "PLAN",
                "OURS_EXTRA_ARGS", "PEER_EXTRA_ARGS", "BENCH_EXTRA_ARGS",
            )
        },
        **{
            k.lower(): int(os.environ[k])
            for k in (
                "NUM_PROMPTS", "INPUT_LEN", "OUTPUT_LEN", "SEED", "MAX_BATCH", "MAX_QUEUED",
                "MAX_SEQ_LEN", "BUDGET_S", "CLIENT_PROCESSES",
            )
        },
        "notes": [
            "our server: --result-cache-size 0 (every run repeats the same seeded prompts)",
            "bench-serve sends ignore_eos; the peer refuses that field (422), so its runs "
            "pass --no-ignore-eos and its saved generation_config has eos_token_id -1 instead",
        ],
    },
    "startups": [
        {"server": s, "seconds_to_ready": int(t), "status": st} for s, t, st in rows(starts_tsv)
    ],
    "skipped": [{"server": s, "rate": r, "reason": why} for s, r, why in rows(skipped_tsv)],
    "runs": runs,
}
path = out / "serve_compare.json"
path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def f(x, d=1):
    return "-" if x is None else f"{x:,.{d}f}"


print(f"\n=== summary ({device}; {doc['git_commit']})")
print("| server | level | rate | ok/sent | output tok/s | p50 TTFT ms | p50 TPOT ms | p99 TTFT ms |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for r in runs:
    s = r["summary"]
    key, _, fw = r["key"].partition("f")
    name = "peer (transformers)" if key == "peer" else {"p": "ours, engine process", "w": f"ours, {key.partition('w')[2]} HTTP workers"}.get(key[5:6], "ours")
    name += f", {fw} prefill forwards a step" if fw else ""
    lvl = "-" if r["level"] is None else r["level"]
    if s is None:
        print(f"| {name} | {lvl} | {r['rate']} | no results (exit {r['exit']}) | | | | |")
        continue
    print(
        f"| {name} | {lvl} | {r['rate']} | {s['completed']}/{s['num_requests']} | "
        f"{f(s['output_throughput'])} | {f(s['ttft']['median'], 2)} | "
        f"{f(s['tpot']['median'], 3)} | {f(s['ttft']['p99'], 2)} |"
    )
for sk in doc["skipped"]:
    print(f"skipped: {sk['server']} at rate {sk['rate']}: {sk['reason']}")
print(f"wrote {path}")
EOF
pack
log "done (budget $BUDGET_S s)"
rm -rf "$WORK"

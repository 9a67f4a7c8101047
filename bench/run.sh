#!/usr/bin/env bash
# The benchmark, in one command: builds in release mode, starts the fast mock upstream and an
# OTLP receiver, starts every target, then measures them interleaved (each step runs every
# target in turn, forward then reverse order) on the same machine and workloads:
#   direct    straight to the mock (the floor)
#   nginx     nginx as a plain pass-through (bench/conf/nginx.conf)
#   bare      bare-pingora, Pingora forwarding and nothing else (with tokentap's listener
#             setting: no L4 read buffer)
#   tokentap  tokentap with full metering: access log, embedded ledger with budgets, traces
#             sent to the live OTLP receiver (bench/conf/tokentap.toml)
#   litellm   the LiteLLM proxy (bench/conf/litellm.yaml), from the virtualenv target/bench-venv
# Raw results go to bench/results/latest.json (and a timestamped copy); bench/report.py then
# writes docs/benchmarks.md and docs/benchmarks-latency.png. bench/measure.py does the measuring.
#
# Placement (this machine has 2 cores): every proxy gets $THREADS worker threads and runs on
# CPU 1; the mock, the OTLP receiver, the load generator (oha) and hold-streams run on CPU 0.
#
# Knobs (environment):
#   BENCH_DURATION=8s   length of every load run
#   BENCH_REPEAT=3      saturation runs per workload and target (the median is reported)
#   BENCH_QUICK=1       2 s runs, fewer rates, 500 held streams instead of 5000: for trying it
#   BENCH_TARGETS=...   a comma list, a subset of direct,nginx,bare,tokentap,litellm
#   THREADS=1           worker threads of each proxy
#   BENCH_HOLD_TIMEOUT=180  seconds the held-streams test may take before it counts as failed
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ALL_TARGETS=direct,nginx,bare,tokentap,litellm
# The command as given, for the report.
BENCH_COMMAND=bench/run.sh
for v in THREADS BENCH_TARGETS BENCH_QUICK BENCH_DURATION BENCH_HOLD_TIMEOUT; do
    if [ -n "${!v:-}" ]; then BENCH_COMMAND="$v=${!v} $BENCH_COMMAND"; fi
done
export BENCH_COMMAND
THREADS=${THREADS:-1}
BENCH_TARGETS=${BENCH_TARGETS:-$ALL_TARGETS}
export THREADS BENCH_TARGETS
PROXY_CPU=1
LOAD_CPU=0
# Everything listens in 18100-18199.
MOCK_PORT=18100
OTLP_PORT=18101
NGINX_PORT=18110
BARE_PORT=18120
TOKENTAP_PORT=18130
TOKENTAP_ADMIN_PORT=18131
LITELLM_PORT=18140
VENV=target/bench-venv
BIN=target/release
STARTED=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)
STARTED_EPOCH=$(date +%s)

say() { echo ">> $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }
wants() { [[ ",$BENCH_TARGETS," == *",$1,"* ]]; }

for t in ${BENCH_TARGETS//,/ }; do
    [[ ",$ALL_TARGETS," == *",$t,"* ]] || die "unknown target '$t' in BENCH_TARGETS (known: $ALL_TARGETS)"
done
[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || die "THREADS must be a positive number, not '$THREADS'"
[[ "${BENCH_DURATION:-8s}" =~ ^[0-9]+(ms|s|m)$ ]] || die "BENCH_DURATION must look like 8s, 1m or 500ms, not '$BENCH_DURATION'"

# ------------------------------------------------------------------ tools
need_rust
need_build_tools
need_deb curl curl
need_deb taskset util-linux
need_deb python3 python3
if wants nginx; then
    [ -x /usr/sbin/nginx ] || install_deb nginx-light
fi
[ "$(nproc --all)" -ge 2 ] || die "the benchmark pins the proxies to CPU 1 and the load to CPU 0: it needs 2 CPUs"
if ! command -v oha >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/oha" ]; then
        PATH="$HOME/.cargo/bin:$PATH"
    else
        say "installing the load generator oha (cargo install oha --locked)"
        cargo install oha --locked || die "could not install oha: cargo install oha --locked"
        PATH="$HOME/.cargo/bin:$PATH"
    fi
fi

# The Python side (measurement, report, chart) and LiteLLM live in a private virtualenv.
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV" 2>/dev/null || {
        rm -rf "$VENV"
        install_deb python3-venv
        python3 -m venv "$VENV"
    }
fi
PY=$VENV/bin/python
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@" || die "pip could not install $*"; }
"$PY" -c 'import matplotlib' 2>/dev/null || pip_install matplotlib
if wants litellm; then
    { [ -x "$VENV/bin/litellm" ] && "$PY" -c 'import fastapi, uvicorn' 2>/dev/null; } || pip_install 'litellm[proxy]'
fi

# 5,000 held streams need 10,000 sockets in a proxy.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge 16384 ] ||
    die "the open-file limit is $(ulimit -n); the stream test needs at least 16384 (ulimit -n)"

say "building (release)"
cargo build --release --bins -p tokentap -p tokentap-bench

# ------------------------------------------------------------------ processes
DIR=$(mktemp -d /tmp/tokentap-bench.XXXXXX)
# nginx's workers run as nobody when started as root: they must reach the files in here.
chmod 755 "$DIR"
PIDS=()
FAILED=""
MEASURE_PID=

alive() {
    local s
    s=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [ -n "$s" ] && [[ "$s" != Z* ]]
}

# stop PID: the process group PID leads (every process is started as one), TERM then KILL.
stop() {
    local pid=$1 i
    kill -TERM -- "-$pid" 2>/dev/null || true
    for i in $(seq 150); do
        alive "$pid" || break
        sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local kept=() p
    for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || kept+=("$p"); done
    PIDS=("${kept[@]+"${kept[@]}"}")
}

cleanup() {
    local status=$? p
    if [ -n "${MEASURE_PID:-}" ]; then
        kill -TERM -- "-$MEASURE_PID" 2>/dev/null || true
    fi
    for p in "${PIDS[@]+"${PIDS[@]}"}"; do stop "$p"; done
    if [ "$status" -eq 0 ] && [ -z "$FAILED" ]; then
        rm -rf "$DIR"
    else
        echo "the run's configs and logs are kept in $DIR" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# start NAME CPU COMMAND...: a new process group pinned to CPU, output in $DIR/NAME.log.
# Sets LAST_PID.
start() {
    local name=$1 cpu=$2
    shift 2
    setsid taskset -c "$cpu" "$@" >"$DIR/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# wait_ready PID SECONDS URL-or-PORT: until the port accepts (or the URL answers 200).
wait_ready() {
    local pid=$1 seconds=$2 what=$3 i
    for i in $(seq $((seconds * 10))); do
        alive "$pid" || return 1
        if [[ "$what" == http* ]]; then
            curl -sf -o /dev/null --max-time 2 "$what" && return 0
        else
            port_open "$what" && return 0
        fi
        sleep 0.1
    done
    return 1
}

# A sample call of each kind must answer 200 before a target is measured.
check_200() {
    local port=$1 kind code
    for kind in 1k-n 1k-s; do
        code=$(head -n1 "$DIR/body-$kind.jsonl" |
            curl -s -o "$DIR/sample-$kind.out" -w '%{http_code}' --max-time 60 \
                -H 'content-type: application/json' -H 'authorization: Bearer sk-bench' \
                --data-binary @- "http://127.0.0.1:$port/v1/chat/completions") || true
        if [ "$code" != 200 ]; then
            echo "a sample $kind call answered ${code:-nothing}: $(head -c 300 "$DIR/sample-$kind.out" 2>/dev/null)"
            return 1
        fi
    done
}

fill() {
    sed -e "s|@PORT@|$2|g" -e "s|@ADMIN_PORT@|$TOKENTAP_ADMIN_PORT|g" -e "s|@THREADS@|$THREADS|g" \
        -e "s|@MOCK_PORT@|$MOCK_PORT|g" -e "s|@DIR@|$DIR|g" -e "s|@OTLP_PORT@|$OTLP_PORT|g" "$1" >"$3"
}

failed() {
    local name=$1 why=$2 log=${3:-}
    if [ -n "$log" ] && [ -f "$log" ]; then why="$why; last log lines: $(tail -n 5 "$log" | tr '\n' ' ')"; fi
    echo "error: $name: $why" >&2
    FAILED="$FAILED $name"
    "$PY" bench/measure.py failed "$name" --dir "$DIR" --error "$why"
}

for port in $MOCK_PORT $OTLP_PORT $NGINX_PORT $BARE_PORT $TOKENTAP_PORT $TOKENTAP_ADMIN_PORT $LITELLM_PORT; do
    if port_open "$port"; then die "port $port is taken: the benchmark uses 18100-18199"; fi
done

"$PY" bench/measure.py bodies "$DIR"

start mock "$LOAD_CPU" "$BIN/bench-mock" --listen "127.0.0.1:$MOCK_PORT" --threads 1
MOCK_PID=$LAST_PID
start otlp-sink "$LOAD_CPU" "$BIN/otlp-sink" --listen "127.0.0.1:$OTLP_PORT"
wait_ready "$MOCK_PID" 10 "$MOCK_PORT" || die "the mock did not start: $(cat "$DIR/mock.log")"
wait_ready "$LAST_PID" 10 "$OTLP_PORT" || die "otlp-sink did not start: $(cat "$DIR/otlp-sink.log")"

# Every target is started first and measured in one interleaved pass (bench/measure.py all):
# each step runs the targets in turn, so a slow minute of this machine falls on targets side by
# side instead of on one target's whole series. A target waits idle, on its core, while the
# others are measured; the report shows the CPU an idle target uses.
SPECS=()
declare -A TARGET_PID
# direct answers first (a failing mock would show in every target).
if wants direct && ! why=$(check_200 "$MOCK_PORT"); then
    die "the mock does not answer: $why"
fi
# Always in the order of ALL_TARGETS, whatever order BENCH_TARGETS gives: bare-pingora and
# tokentap must be neighbours for their rounds to pair.
for t in ${ALL_TARGETS//,/ }; do
    wants "$t" || continue
    say "starting $t"
    case $t in
    direct)
        SPECS+=("direct:$MOCK_PID:$MOCK_PORT")
        continue
        ;;
    nginx)
        fill bench/conf/nginx.conf "$NGINX_PORT" "$DIR/nginx.conf"
        mkdir -p "$DIR/nginx-body" "$DIR/nginx-proxy"
        start nginx "$PROXY_CPU" /usr/sbin/nginx -c "$DIR/nginx.conf" -p "$DIR" -e "$DIR/nginx-error.log"
        port=$NGINX_PORT ready=$NGINX_PORT wait_s=10
        ;;
    bare)
        start bare "$PROXY_CPU" "$BIN/bare-pingora" --listen "127.0.0.1:$BARE_PORT" \
            --upstream "127.0.0.1:$MOCK_PORT" --threads "$THREADS" --l4-read-buffer 0
        port=$BARE_PORT ready=$BARE_PORT wait_s=10
        ;;
    tokentap)
        fill bench/conf/tokentap.toml "$TOKENTAP_PORT" "$DIR/tokentap.toml"
        cp bench/conf/pricing.toml "$DIR/pricing.toml"
        "$BIN/tokentap" check-config "$DIR/tokentap.toml" >"$DIR/check-config.log" 2>&1 ||
            die "tokentap rejects the benchmark's config: $(cat "$DIR/check-config.log")"
        start tokentap "$PROXY_CPU" "$BIN/tokentap" serve --config "$DIR/tokentap.toml"
        port=$TOKENTAP_PORT ready=$TOKENTAP_PORT wait_s=10
        ;;
    litellm)
        fill bench/conf/litellm.yaml "$LITELLM_PORT" "$DIR/litellm.yaml"
        # The local copy of LiteLLM's price list: no fetch from the network at start.
        start litellm "$PROXY_CPU" env LITELLM_LOCAL_MODEL_COST_MAP=True \
            "$VENV/bin/litellm" --config "$DIR/litellm.yaml" --host 127.0.0.1 --port "$LITELLM_PORT" --num_workers 1
        port=$LITELLM_PORT ready="http://127.0.0.1:$LITELLM_PORT/health/liveliness" wait_s=240
        ;;
    esac
    pid=$LAST_PID
    if ! wait_ready "$pid" "$wait_s" "$ready"; then
        failed "$t" "did not start within $wait_s s" "$DIR/$t.log"
        stop "$pid"
    elif ! why=$(check_200 "$port"); then
        failed "$t" "$why" "$DIR/$t.log"
        stop "$pid"
    else
        SPECS+=("$t:$pid:$port")
        TARGET_PID[$t]=$pid
    fi
done

if [ "${#SPECS[@]}" -gt 0 ]; then
    say "measuring ${SPECS[*]}"
    args=()
    for s in "${SPECS[@]}"; do args+=(--target "$s"); done
    # In the background, in its own process group, so that a signal reaches the traps at
    # once (bash runs them only when a foreground command ends) and cleanup can stop it with
    # the load it started.
    setsid taskset -c "$LOAD_CPU" "$PY" bench/measure.py all "${args[@]}" --dir "$DIR" --mock-port "$MOCK_PORT" &
    MEASURE_PID=$!
    if ! wait "$MEASURE_PID"; then
        # The targets it could not measure have a failed result; the others have theirs.
        for s in "${SPECS[@]}"; do
            t=${s%%:*}
            grep -Eq '"status": "(failed|incomplete)"' "$DIR/results/$t.json" 2>/dev/null && FAILED="$FAILED $t"
            [ -f "$DIR/results/$t.json" ] || failed "$t" "the measurement failed"
        done
    fi
    MEASURE_PID=
fi

for t in "${!TARGET_PID[@]}"; do
    stop "${TARGET_PID[$t]}"
done
if [ -n "${TARGET_PID[tokentap]:-}" ] && grep -q '"status": "ok"' "$DIR/results/tokentap.json" 2>/dev/null; then
    # Stopped, so every span, log line and ledger row is flushed: the proof of metering.
    "$PY" bench/measure.py metering tokentap --dir "$DIR" --otlp-port "$OTLP_PORT" \
        --access-log "$DIR/tokentap-access.log" --config "$DIR/tokentap.toml" --tokentap "$BIN/tokentap"
fi

mkdir -p bench/results
"$PY" bench/measure.py finish --dir "$DIR" --targets "$BENCH_TARGETS" --out bench/results/latest.json \
    --copy "bench/results/$(date -u +%Y%m%d-%H%M%S).json" --started "$STARTED" --started-epoch "$STARTED_EPOCH"
"$PY" bench/report.py bench/results/latest.json
say "done in $(($(date +%s) - STARTED_EPOCH)) s: bench/results/latest.json, docs/benchmarks.md, docs/benchmarks-latency.png"
[ -z "$FAILED" ] || die "these targets failed (see the report):$FAILED"

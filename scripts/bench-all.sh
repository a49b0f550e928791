#!/usr/bin/env bash
# Every figure of docs/benchmarks.md, 3 runs each, on the stack of scripts/benchstack.sh.
# Run it on an otherwise idle machine; it takes about 30 minutes. Results: one JSON file per
# run in $OUT (default /tmp/stakepro-bench-results), then scripts/bench_summary.py prints
# min / median / max of each figure.
#   DURATION (60) seconds per bets run; RUNS (3); SKIP="echo refecho two ..." to leave parts
#   out (bets echo refecho two full spectators persist storm sockets).
#   bash reads this file as it runs: do not edit it while a run is going (copy it first).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/stakepro-bench-results}  # not under benchstack.sh's folder: start wipes it
DURATION=${DURATION:-60}
RUNS=${RUNS:-3}
SKIP=${SKIP:-}
PORT=${BENCH_PORT:-8030}
URL=ws://127.0.0.1:$PORT
REF_PORT=$((PORT + 1))
PY=.venv/bin/python
mkdir -p "$OUT"
export ADMIN_TOKEN=${ADMIN_TOKEN:-bench}

skip() { [[ " $SKIP " == *" $1 "* ]]; }
lt() {  # lt NAME ARGS...: one loadtest run, its JSON kept as $OUT/NAME.json
    local name=$1; shift
    echo "== $name: python -m loadtest $*" >&2
    $PY -m loadtest "$@" --json >"$OUT/$name.json" || echo "   (exit $?)" >&2
}
machine() {
    { echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"; echo "nproc: $(nproc)";
      free -g | sed -n 2p; grep -m1 'model name' /proc/cpuinfo; uname -sr;
      echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"; } >"$OUT/machine.txt"
}

machine
if ! skip bets; then
    # The game server alone (the outbox waits for the workers), alternated with the two
    # echoes: /debug/echo on the server's own socket layer, and the issue's reference, a bare
    # ASGI echo on stock uvicorn (bench/echo_server.py; players made on the server).
    scripts/benchstack.sh start serve
    if curl -s "http://127.0.0.1:$REF_PORT/" >/dev/null; then
        echo "port $REF_PORT is taken: the reference echo needs it" >&2; exit 1
    fi
    $PY -m bench.echo_server --port "$REF_PORT" >"$OUT/refecho.log" 2>&1 &
    ref_pid=$!
    for _ in $(seq 40); do
        curl -s "http://127.0.0.1:$REF_PORT/" >/dev/null && break
        sleep 0.25
    done
    for i in $(seq "$RUNS"); do
        report=()
        [[ $i == 2 ]] && report=(--report "$OUT/bets-report.html")
        lt "bets-$i" bets --url "$URL" --connections 100 --inflight 4 --duration "$DURATION" \
            "${report[@]}"
        skip echo || lt "echo-$i" bets --url "$URL/debug/echo" --connections 100 \
            --inflight 4 --duration "$DURATION"
        skip refecho || lt "refecho-$i" bets --url "ws://127.0.0.1:$REF_PORT" \
            --http "http://127.0.0.1:$PORT" --connections 100 --inflight 4 --duration "$DURATION"
    done
    kill "$ref_pid" 2>/dev/null || true
    wait "$ref_pid" 2>/dev/null || true
    # Unqueued: one socket, one bet in flight, paced under the per-socket rate limit (2,000
    # messages/s: one socket with one bet in flight now goes faster than that).
    lt "unqueued" bets --url "$URL" --connections 1 --inflight 1 --duration 10 --rate 1000
fi
if ! skip two; then
    SERVER_PROCESSES=2 scripts/benchstack.sh start serve
    for i in $(seq "$RUNS"); do
        lt "two-$i" bets --url "$URL" --connections 100 --inflight 4 --duration "$DURATION"
    done
fi
if ! skip full; then
    # make run's whole stack: server, worker and scheduler share the cores with the load.
    scripts/benchstack.sh start full
    lt "full-1" bets --url "$URL" --connections 100 --inflight 4 --duration "$DURATION"
fi
if ! skip spectators; then
    scripts/benchstack.sh start serve
    for i in $(seq "$RUNS"); do
        lt "spectators-$i" spectators --url "$URL" --count 1000 --encoding msgpack \
            --bet-rate 5000 --connections 50 --inflight 8 --duration 20
    done
fi
if ! skip persist; then
    for i in $(seq "$RUNS"); do
        scripts/benchstack.sh start full
        lt "persist-$i" storm --url "$URL" --players 1000 --masters 5 --agents 50 \
            --burst 1000 --sustained 30 --rate 5000 --lag-sample 100 --poll-interval 0.1 \
            --client picows --quiet
    done
fi
if ! skip storm; then
    # Scenario 2 at the issue's scale: 10,000 players under one super master, 500 betting in
    # the same second, on make run's stack.
    for i in $(seq "$RUNS"); do
        scripts/benchstack.sh start full
        lt "storm-$i" storm --url "$URL" --players 10000 --burst 500 --client picows --quiet
    done
fi
if ! skip sockets; then
    for i in $(seq "$RUNS"); do
        scripts/benchstack.sh start serve  # a fresh process: Python keeps memory it freed
        lt "sockets-$i" sockets --url "$URL" --count 10000 --hold 20 --client picows
    done
fi
scripts/benchstack.sh stop
$PY scripts/bench_summary.py "$OUT"

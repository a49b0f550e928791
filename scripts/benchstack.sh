#!/usr/bin/env bash
# The stack the benchmarks in docs/benchmarks.md ran on, on a Redis and a database of its own.
#   scripts/benchstack.sh start [full|serve]   full: server + worker + scheduler (make run's
#                                              python -m stakepro); serve: the game server
#                                              alone (the outbox waits for the workers)
#   scripts/benchstack.sh workers              start the worker and scheduler beside `serve`
#   scripts/benchstack.sh stop
# Ports: BENCH_PORT (8030) for the server, BENCH_REDIS_PORT (6398); database BENCH_DB
# (stakepro_bench).
# BENCH_REDIS=cluster puts the stack on a Redis Cluster of its own instead (3 masters and 3
# replicas on free loopback ports, bench/clusterstack.py), each node with the same AOF
# settings as the single Redis; REDIS_URL names one of its nodes.
# Redis keeps an AOF (appendfsync always, as make run; BENCH_APPENDFSYNC=everysec for the
# comparison in docs/benchmarks.md), but does not compact it by
# itself (auto-aof-rewrite-percentage 0): a rewrite forks a child that takes a whole core for
# seconds, and on 2 cores shared with the server and the load client it made the slow
# stretches of the runs (docs/benchmarks.md). Where Redis has cores of its own, leave the
# rewrites on, or run BGREWRITEAOF at quiet times. Every start begins empty.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${BENCH_PORT:-8030}
RPORT=${BENCH_REDIS_PORT:-6398}
DIR=${BENCH_DIR:-/tmp/stakepro-bench}
DB=${BENCH_DB:-stakepro_bench}
export ADMIN_TOKEN=${ADMIN_TOKEN:-bench} REDIS_URL=redis://127.0.0.1:$RPORT/0 \
    DATABASE_URL=postgresql://root@127.0.0.1:5432/$DB DEBUG_ECHO=true PORT LOG_LEVEL=warning \
    REDIS_DURABILITY=${BENCH_APPENDFSYNC:-always}
# The load tools sign in thousands of players from one loopback address: lift the
# per-address and per-user limits that protect a deployment (docs/security.md).
export SIGNIN_PER_MINUTE=1e9 SIGNIN_BURST=1000000000 ADMIN_PER_MINUTE=1e9 \
    ADMIN_BURST=1000000000 USER_MAX_SOCKETS=1000000 USER_BETS_PER_S=1e9 \
    USER_BETS_BURST=1000000000 USER_MESSAGES_PER_S=1e9 USER_MESSAGES_BURST=1000000000

stop() {
    local pids=()
    for f in "$DIR"/*.pid; do
        [[ -e $f ]] || continue
        pids+=("$(cat "$f")")
        rm -f "$f"
    done
    if ((${#pids[@]})); then
        kill "${pids[@]}" 2>/dev/null || true
        # make run's supervisor stops its children in order (the worker finishes its batch):
        # wait for every process to be gone before the database is dropped.
        for _ in $(seq 60); do
            kill -0 "${pids[@]}" 2>/dev/null || break
            sleep 0.5
        done
        kill -9 "${pids[@]}" 2>/dev/null || true
    fi
    redis-cli -p "$RPORT" shutdown nosave >/dev/null 2>&1 || true
    [[ -e $DIR/cluster.root ]] && .venv/bin/python -m bench.clusterstack stop "$DIR"
    return 0
}

case ${1:-} in
start)
    stop
    rm -rf "$DIR"; mkdir -p "$DIR/redis"
    if [[ ${BENCH_REDIS:-single} == cluster ]]; then
        REDIS_URL=$(setsid .venv/bin/python -m bench.clusterstack start "$DIR" \
            --appendfsync "${BENCH_APPENDFSYNC:-always}")
        export REDIS_URL
    else
        redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly yes \
            --appendfsync "${BENCH_APPENDFSYNC:-always}" --auto-aof-rewrite-percentage 0 \
            --dir "$DIR/redis" --daemonize yes --logfile "$DIR/redis.log"
    fi
    psql -h 127.0.0.1 -U root -d postgres -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" \
        -c "CREATE DATABASE $DB"
    if [[ ${2:-full} == serve ]]; then
        .venv/bin/python -c 'import asyncio, server.db as d, plumbing.settings as s
asyncio.run(d.migrate(s.Settings().database_url))'
        INPROCESS_PERSISTER=false setsid .venv/bin/python -m stakepro serve \
            >"$DIR/serve.log" 2>&1 &
    else
        setsid .venv/bin/python -m stakepro >"$DIR/stack.log" 2>&1 &
    fi
    echo $! >"$DIR/stack.pid"
    for _ in $(seq 120); do
        curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
        sleep 0.5
    done
    curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null
    echo "server pid $(ss -ltnpH "sport = :$PORT" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)" \
        "on ws://127.0.0.1:$PORT, redis $REDIS_URL"
    ;;
workers)
    if [[ -e $DIR/cluster.url ]]; then
        # On a cluster the Dramatiq broker cannot default to REDIS_URL's server.
        [[ -n ${BROKER_URL:-} ]] || { echo "$0: set BROKER_URL for workers on a cluster" >&2; exit 2; }
        REDIS_URL=$(cat "$DIR/cluster.url"); export REDIS_URL
    fi
    setsid .venv/bin/python -m dramatiq workers.actors --processes 1 --threads 4 \
        --worker-shutdown-timeout 18000 >"$DIR/worker.log" 2>&1 &
    echo $! >"$DIR/worker.pid"
    setsid .venv/bin/python -m workers.scheduler >"$DIR/scheduler.log" 2>&1 &
    echo $! >"$DIR/scheduler.pid"
    ;;
stop) stop ;;
*) echo "usage: $0 start [full|serve] | workers | stop" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# The bet path of two checkouts, alternated in one run, so their ratio survives a noisy
# machine (docs/benchmarks.md, "Bet path after the one-house restructure").
#   bench/ab_trees.sh BEFORE_TREE AFTER_TREE
# Each tree must have its own .venv with the project on its path (scripts/devenv.sh venv, or
# a .pth file for an older checkout). Each round starts that tree's own benchstack (the game
# server alone on a fresh Redis and database), runs this checkout's load client against it
# (100 sockets x 4 in flight), and stops it.
#   ROUNDS (3) rounds of both trees; DURATION (20) seconds per run; OUT (/tmp/stakepro-ab).
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
BEFORE=$(cd "$1" && pwd)
AFTER=$(cd "$2" && pwd)
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-20}
OUT=${OUT:-/tmp/stakepro-ab}
PORT=${BENCH_PORT:-8030}
export ADMIN_TOKEN=${ADMIN_TOKEN:-bench}
mkdir -p "$OUT"
{ echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"; echo "nproc: $(nproc)"
  grep -m1 'model name' /proc/cpuinfo; uname -sr
  echo "before: $BEFORE $(git -C "$BEFORE" rev-parse --short HEAD)"
  echo "after: $AFTER $(git -C "$AFTER" rev-parse --short HEAD)"
  echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"; } >"$OUT/machine.txt"

run() {  # run NAME TREE
    (cd "$2" && scripts/benchstack.sh start serve >/dev/null)
    echo "== $1: load $(cut -d' ' -f1 /proc/loadavg)" >&2
    "$HERE/.venv/bin/python" -m loadtest bets --url "ws://127.0.0.1:$PORT" --connections 100 \
        --inflight 4 --duration "$DURATION" --json >"$OUT/$1.json" || echo "   (exit $?)" >&2
    (cd "$2" && scripts/benchstack.sh stop >/dev/null)
}

for i in $(seq "$ROUNDS"); do
    run "before-$i" "$BEFORE"
    run "after-$i" "$AFTER"
done
"$HERE/.venv/bin/python" - "$OUT" "$ROUNDS" <<'EOF'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
for i in range(1, rounds + 1):
    b = json.load(open(f"{out}/before-{i}.json"))
    a = json.load(open(f"{out}/after-{i}.json"))
    print(f"round {i}: before {b['bets_per_s']:,.0f} bets/s p99 {b['latency_ms']['p99']:.1f} ms"
          f" | after {a['bets_per_s']:,.0f} bets/s p99 {a['latency_ms']['p99']:.1f} ms"
          f" | after/before {a['bets_per_s'] / b['bets_per_s']:.3f}")
EOF

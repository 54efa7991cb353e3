#!/bin/bash
# Worker against worker: one base-worker per source tree, started side by side, then wrk runs
# alternating between them (round 1: A, B, ...; round 2: A, B, ...), each printing the
# worker's CPU time per answered request read from /proc (user + system ticks).
#
#   bench/ab.sh CONNECTIONS ROUNDS TREE_A TREE_B ...      # e.g. bench/ab.sh 64 3 /tmp/base .
#
# Needs wrk and the .venv of this checkout (`make .venv/bin/.installed-fast`); 127.0.0.1 only.
# docs/performance.md uses it where two versions of the worker differ by less than the noise
# between a worker and the baseline.
set -euo pipefail
C=$1; ROUNDS=$2; shift 2
HERE=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
PORT=18940; PIDS=(); PORTS=()
trap 'for P in "${PIDS[@]}"; do kill "$P" 2>/dev/null || true; done; rm -rf "$TMP"' EXIT
for SRC in "$@"; do
  SRC=$(cd "$SRC" && pwd)
  cat > "$TMP/w-$PORT.toml" <<TOML
[worker]
slots = 100
functions = ["worker.examples", "$HERE/bench/functions.py"]
[http]
host = "127.0.0.1"
port = $PORT
[auth]
auth_key = "bench-key"
[load_balancer]
websocket_port = 0
[logging]
level = "info"
format = "json"
TOML
  (cd "$SRC" && exec "$HERE/.venv/bin/python" -m worker --config "$TMP/w-$PORT.toml" > "$TMP/w-$PORT.log" 2>&1) &
  PIDS+=($!); PORTS+=($PORT); PORT=$((PORT+1))
done
sleep 3
export BENCH_BODY='{"function": "hello", "input": {"name": "Andera"}, "contract": 1}' BENCH_AUTH=bench-key
for PORTN in "${PORTS[@]}"; do  # warm-up, not recorded
  wrk -t1 -c"$C" -d2s -s "$HERE/bench/post.lua" "http://127.0.0.1:$PORTN/task" > /dev/null
done
TREES=("$@")
for r in $(seq "$ROUNDS"); do
  for i in "${!PORTS[@]}"; do
    P=${PIDS[$i]}
    T0=$(awk '{print $14+$15}' "/proc/$P/stat")
    N=$(wrk -t1 -c"$C" -d4s -s "$HERE/bench/post.lua" "http://127.0.0.1:${PORTS[$i]}/task" \
      | sed -n 's/.*"requests": \([0-9]*\).*/\1/p')
    T1=$(awk '{print $14+$15}' "/proc/$P/stat")
    TICKS=$(getconf CLK_TCK)
    US=$(awk -v t=$((T1-T0)) -v n="$N" -v hz="$TICKS" 'BEGIN {printf "%.1f", t/hz/n*1e6}')
    echo "round $r ${TREES[$i]} c=$C requests=$N cpu_us_per_request=$US req_per_s=$((N/4))"
  done
done

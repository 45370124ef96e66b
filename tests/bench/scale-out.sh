#!/usr/bin/env bash
# The engine's cost: the same WebSocket fan-out load against
#   1. one instance with the embedded store,
#   2. one instance on Redis,
#   3. three instances on one Redis (subscribers and publishers spread over them),
# and the Redis commands each publish costs (INFO commandstats while publishing ÷ items).
#
#   tests/bench/scale-out.sh [S] [M] [RATE] [PUBLISHERS]
#
# Defaults: S = 3000 subscribers, M = 15000 items at RATE = 1000 items/s from 16 publishers.
# Release builds are used (cargo build --release -p juxta-gateway -p juxta-tests --bins).
# Redis runs with AOF on and `appendfsync always` (what the guarantee needs); set
# SCALE_OUT_FSYNC=everysec to compare. Everything shares this machine's cores.
# SCALE_OUT_ONLY="embedded redis1 redis3" picks runs; SCALE_OUT_WORKERS=N gives each of
# the three instances N tokio worker threads (default: one per core each).
set -euo pipefail
cd "$(dirname "$0")/../.."

S="${1:-3000}"
M="${2:-15000}"
RATE="${3:-1000}"
PUBS="${4:-16}"
FSYNC="${SCALE_OUT_FSYNC:-always}"
BIN="${CARGO_TARGET_DIR:-target}/release"
[ -x "$BIN/juxta" ] && [ -x "$BIN/juxta-load" ] || {
  echo "build first: cargo build --release -p juxta-gateway -p juxta-tests --bins" >&2
  exit 1
}
ulimit -n 65536 2>/dev/null || true

work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

rport="$(free_port)"
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly yes \
  --appendfsync "$FSYNC" --dir "$work" --daemonize no >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
url="redis://127.0.0.1:$rport"
reset="redis-cli -p $rport config resetstat >/dev/null" # run by the load tool before publishing
key="bench-admin-key-0123456789abcdef0123"

commands() { # total calls in INFO commandstats, and the top commands
  redis-cli -p "$rport" info commandstats | tr -d '\r' | grep '^cmdstat_' |
    sed -E 's/^cmdstat_([^:]+):calls=([0-9]+).*/\2 \1/' | sort -rn
}

report() { # name, json file, commands file (or -)
  python3 - "$1" "$2" "$3" "$M" <<'EOF'
import json, sys
name, path, cmds, m = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
r = json.loads(open(path).read().strip().splitlines()[-1])
lat = r["latency_ms"]
print(f"{name}: {r['deliveries_per_second']:.0f} deliveries/s, "
      f"{r['deliveries']}/{r['expected_deliveries']} delivered, "
      f"latency p50 {lat['p50']} / p99 {lat['p99']} / max {lat['max']} ms, "
      f"lost {r['lost']}, duplicates {r['duplicates']}, "
      f"publish rate {r['publish_rate']:.0f}/s (p99 {r['publish_latency_ms']['p99']} ms), "
      f"publish errors {r['publish_errors']}, "
      f"subscriber errors {r['subscriber_errors']}, "
      f"events_lost notices {r['events_lost_notices']}")
if cmds != "-":
    rows = [l.split() for l in open(cmds) if l.strip()]
    calls = {n: int(c) for c, n in rows}
    total = sum(calls.values())
    background = sum(calls.get(n, 0) for n in ("ping", "config|resetstat", "info", "cluster|slots"))
    # Counted from the first publish on (the load tool resets the statistics once every
    # subscriber is connected). The publish path: the script call and what it runs (XADD and
    # SPUBLISH; ZADD, HMGET, GET/SET of idempotency keys, WAIT when they occur). EVALSHA also
    # counts the few node-state scripts run meanwhile, so this is an upper bound. The rest is
    # polling that does not depend on publishes (the membership log, the overlay's node list,
    # node-state reads: XRANGE, XREVRANGE, XLEN, SMEMBERS, ...).
    path = ("evalsha", "xadd", "spublish", "zadd", "zrem", "hmget", "get", "set", "wait")
    publish_path = sum(calls.get(n, 0) for n in path)
    other = total - background - publish_path
    print(f"  redis commands while publishing: {publish_path} on the publish path = "
          f"{publish_path / m:.2f} per publish; {other} others ({other / m:.2f} per publish), "
          f"{background} pings and stats; top: " + ", ".join(f"{n} {c}" for c, n in rows[:9]))
EOF
}

load=("$BIN/juxta-load" -s "$S" -m "$M" --rate "$RATE" --publishers "$PUBS" --connect-batch 500 --json)

only="${SCALE_OUT_ONLY:-embedded redis1 redis3}"
if [[ " $only " == *" embedded "* ]]; then
echo "== 1 instance, embedded store"
"${load[@]}" >"$work/embedded.json"
report "embedded x1" "$work/embedded.json" -
fi

if [[ " $only " == *" redis1 "* ]]; then
echo "== 1 instance, Redis"
"${load[@]}" --before-publish "$reset" --env JUXTA_STORE__BACKEND=redis --env "JUXTA_STORE__URL=$url" >"$work/redis1.json"
commands >"$work/redis1.cmds"
report "redis x1" "$work/redis1.json" "$work/redis1.cmds"
fi

[[ " $only " == *" redis3 "* ]] || exit 0

echo "== 3 instances, one Redis"
urls=()
for i in 1 2 3; do
  hp="$(free_port)"
  ${SCALE_OUT_WORKERS:+env TOKIO_WORKER_THREADS=$SCALE_OUT_WORKERS} \
  JUXTA_ADMIN_KEY="$key" JUXTA_STORE__BACKEND=redis JUXTA_STORE__URL="$url" \
    JUXTA_XMPP__ENABLED=false JUXTA_P2P__ENABLED=false JUXTA_LOG__LEVEL=warn \
    "$BIN/juxta" serve --data-dir "$work/d$i" --http "127.0.0.1:$hp" >"$work/juxta$i.log" 2>&1 &
  pids+=($!)
  urls+=("http://127.0.0.1:$hp")
done
for u in "${urls[@]}"; do
  for _ in $(seq 100); do curl -sf "$u/readyz" >/dev/null && break; sleep 0.1; done
done
"${load[@]}" --before-publish "$reset" --url "${urls[0]}" --also-url "${urls[1]}" --also-url "${urls[2]}" --token "$key" \
  >"$work/redis3.json"
commands >"$work/redis3.cmds"
report "redis x3" "$work/redis3.json" "$work/redis3.cmds"

#!/usr/bin/env bash
# What one idle gateway instance costs Redis: the Redis commands per second a `juxta serve` on
# the Redis engine issues with NODES nodes and no traffic (overlay on, so every node has a
# local subscriber: its pipe feeder), over SECONDS, from Redis's INFO. See tests/BENCHMARKS.md
# ("Scale-out", idle cost).
#
#   bash tests/bench/engine-idle.sh [NODES] [SECONDS]
#
# JUXTA_BIN picks the binary (default target/release/juxta, else target/debug/juxta);
# BENCH_PORT the Redis port (default 16550; HTTP uses BENCH_PORT + 1).
set -euo pipefail
cd "$(dirname "$0")/../.."

nodes="${1:-1000}"
seconds="${2:-130}"
bin="${JUXTA_BIN:-}"
if [ -z "$bin" ]; then
  for b in "${CARGO_TARGET_DIR:-target}/release/juxta" "${CARGO_TARGET_DIR:-target}/debug/juxta"; do
    [ -x "$b" ] && { bin="$b"; break; }
  done
fi
[ -x "$bin" ] || { echo "no juxta binary: build it or set JUXTA_BIN" >&2; exit 1; }
port="${BENCH_PORT:-16550}"
http=$((port + 1))
key="idle-bench-admin-key-0123456789abcdef"
dir=$(mktemp -d)
cleanup() {
  [ -n "${juxta_pid:-}" ] && kill "$juxta_pid" 2>/dev/null || true
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

redis-server --port "$port" --bind 127.0.0.1 --save "" --dir "$dir" --daemonize yes >/dev/null
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
JUXTA_ADMIN_KEY="$key" JUXTA_STORE__BACKEND=redis JUXTA_STORE__URL="redis://127.0.0.1:$port" \
  "$bin" serve --data-dir "$dir/juxta" --http "127.0.0.1:$http" --xmpp 127.0.0.1:0 \
  --p2p /ip4/127.0.0.1/tcp/0 >"$dir/juxta.log" 2>&1 &
juxta_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$http/readyz" >/dev/null && break; sleep 0.1; done
for i in $(seq "$nodes"); do
  curl -sf -o /dev/null -X PUT -H "Authorization: Bearer $key" -H 'content-type: application/json' \
    -d '{}' "http://127.0.0.1:$http/api/v1/nodes/idle-$i"
done
sleep 5
stats() { redis-cli -p "$port" info commandstats | tr -d '\r' | sed -n 's/^cmdstat_\([a-z|]*\):calls=\([0-9]*\),.*/\1 \2/p' | sort; }
total() { redis-cli -p "$port" info stats | tr -d '\r' | sed -n 's/^total_commands_processed:\([0-9]*\)/\1/p'; }
before=$(stats); t0=$(total)
sleep "$seconds"
after=$(stats); t1=$(total)
echo "binary $bin, $nodes nodes, idle for $seconds s:"
echo "  $(( (t1 - t0) / seconds )) Redis commands/s"
join <(echo "$before") <(echo "$after") | awk -v s="$seconds" '$3 > $2 { printf "  %-12s %.1f/s\n", $1, ($3 - $2) / s }' | sort -k2 -n -r

#!/usr/bin/env bash
# Durable publish on the Redis engine, no subscribers: a fresh redis-server (AOF on,
# `appendfsync always`) on a free port, 64 concurrent REST publishers for 10 s against a
# spawned release `juxta serve`, then the Redis commands that ran (INFO commandstats).
#
#   tests/bench/durable-redis.sh [PUBLISHERS] [SECONDS]
#
# Build first: cargo build --release -p juxta-gateway --bin juxta -p juxta-tests --bin juxta-load
set -euo pipefail
cd "$(dirname "$0")/../.."
PUBS="${1:-64}"
SECS="${2:-10}"
BIN="${CARGO_TARGET_DIR:-target}/release"
[ -x "$BIN/juxta" ] && [ -x "$BIN/juxta-load" ] || {
  echo "build first: cargo build --release -p juxta-gateway --bin juxta -p juxta-tests --bin juxta-load" >&2
  exit 1
}
work="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly yes --appendfsync always \
  --dir "$work" --daemonize no >"$work/redis.log" 2>&1 &
rpid=$!
trap 'kill $rpid 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
"$BIN/juxta-load" --mode durable-publish --publishers "$PUBS" --duration "$SECS" \
  --env JUXTA_STORE__BACKEND=redis --env "JUXTA_STORE__URL=redis://127.0.0.1:$port"
echo "Redis commands:"
redis-cli -p "$port" info commandstats | tr -d '\r' | grep '^cmdstat_' |
  sed -E 's/^cmdstat_([^:]+):calls=([0-9]+).*/  \2 \1/' | sort -rn | head -8

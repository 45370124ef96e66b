#!/usr/bin/env bash
# The overlay benchmark of tests/BENCHMARKS.md ("Overlay pipes (issue 4)"): N edge peers
# (juxta-overlay-bench, one process) follow one node of a release gateway; items are published
# over REST at a fixed rate; it reports publish -> receipt latency, loss, order and gossipsub's
# duplicate copies per delivery.
#
#   bash tests/bench/overlay.sh loopback [PEERS] [RATE] [SECONDS]
#   bash tests/bench/overlay.sh nat      [PEERS] [RATE] [SECONDS]   (root: network namespaces)
#
# loopback: gateway and peers on 127.0.0.1. nat: the gateway on the public segment of
# tests/nat/topology.sh, the peers behind NAT router 1 (they can only dial out; members reach
# each other through the gateway's relay, then hole punching), REST published from behind the
# NAT too. Needs release builds (`cargo build --release -p juxta-gateway --bin juxta -p
# juxta-tests --bin juxta-overlay-bench`); waits for a quiet CPU first.
set -euo pipefail
cd "$(dirname "$0")/../.."

mode="${1:-loopback}"
peers="${2:-20}"
rate="${3:-1000}"
seconds="${4:-10}"
juxta=target/release/juxta
bench=target/release/juxta-overlay-bench
for bin in "$juxta" "$bench"; do
  [ -x "$bin" ] || { echo "$bin is missing: build the release binaries first" >&2; exit 1; }
done

wait_quiet() {
  while pgrep -x cargo >/dev/null || pgrep -x rustc >/dev/null; do sleep 2; done
}

dir=$(mktemp -d /tmp/juxta-overlay-bench.XXXXXX)
gateway_pid=
cleanup() {
  [ -n "$gateway_pid" ] && kill "$gateway_pid" 2>/dev/null && wait "$gateway_pid" 2>/dev/null
  [ "$mode" = nat ] && bash tests/nat/topology.sh down jxbench >/dev/null 2>&1
  rm -rf "$dir"
}
trap cleanup EXIT

case "$mode" in
  loopback)
    http=127.0.0.1:18190
    p2p=/ip4/127.0.0.1/tcp/0
    run=()
    ;;
  nat)
    [ "$(id -u)" = 0 ] || { echo "nat mode needs root" >&2; exit 1; }
    bash tests/nat/topology.sh up jxbench 88 >/dev/null
    http=10.88.0.1:18190
    p2p=/ip4/10.88.0.1/tcp/0
    run=(ip netns exec jxbench-p1)
    ;;
  *) echo "mode: loopback or nat" >&2; exit 2 ;;
esac

wait_quiet
JUXTA_ADMIN_KEY=overlay-bench-admin-key "$juxta" serve --data-dir "$dir/data" --http "$http" \
  --xmpp 127.0.0.1:0 --p2p "$p2p" >"$dir/gateway.log" 2>&1 &
gateway_pid=$!
for _ in $(seq 100); do
  grep -q "listening http" "$dir/gateway.log" && break
  sleep 0.1
done
bootstrap=$(awk '/listening p2p/ {print $3; exit}' "$dir/gateway.log")
[ -n "$bootstrap" ] || { cat "$dir/gateway.log" >&2; exit 1; }
cmd=("${run[@]}" "$bench" --url "http://$http" --admin-key overlay-bench-admin-key
  --bootstrap "$bootstrap" --peers "$peers" --rate "$rate" --seconds "$seconds")
[ "$mode" = nat ] && cmd+=(--listen /ip4/0.0.0.0/tcp/0)
echo "# ${cmd[*]}" >&2
"${cmd[@]}"
# What the gateway counted: pipe messages sent, refusals.
"${run[@]}" curl -s "http://$http/metrics" | grep -E '^juxta_overlay_(egressed|ingested|rejected)' >&2 || true
grep -E 'WARN|ERROR' "$dir/gateway.log" | tail -5 >&2 || true

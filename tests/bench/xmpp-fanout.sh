#!/usr/bin/env bash
# The XMPP pubsub fan-out comparison of tests/BENCHMARKS.md ("XMPP pubsub fan-out (issue 3)"):
# juxta and Debian's Prosody, the same scenarios, one after the other on this machine.
#
#   bash tests/bench/xmpp-fanout.sh [OUT_DIR] [REPEATS]
#
# Needs release builds (`cargo build --release -p juxta-gateway --bin juxta -p juxta-tests
# --bin juxta-load`) and `prosody` on PATH (`apt-get install prosody`; a system-wide Prosody
# may run, ours uses its own free port and directory). Before each run it waits until no cargo
# or rustc runs and the CPUs are at least 90 % idle, since server and load tool share the
# machine. Each run's command and human-readable report go to OUT_DIR/report.txt, its JSON to
# OUT_DIR/<name>.json.
set -euo pipefail
cd "$(dirname "$0")/../.."

out="${1:-target/bench-xmpp-$(date +%Y%m%d-%H%M%S)}"
repeats="${2:-3}"
load="${JUXTA_LOAD:-target/release/juxta-load}"
mkdir -p "$out"
for bin in "$load" target/release/juxta; do
  [ -x "$bin" ] || { echo "$bin is missing: build the release binaries first" >&2; exit 1; }
done
command -v prosody >/dev/null || { echo "prosody is not installed (apt-get install prosody)" >&2; exit 1; }

# Percent of CPU time idle over two seconds, from /proc/stat.
cpu_idle() {
  local u n s i w x y z t1 i1 t2 i2
  read -r _ u n s i w x y z _ </proc/stat
  t1=$((u + n + s + i + w + x + y + z)) i1=$((i + w))
  sleep 2
  read -r _ u n s i w x y z _ </proc/stat
  t2=$((u + n + s + i + w + x + y + z)) i2=$((i + w))
  echo $((100 * (i2 - i1) / (t2 - t1)))
}

# Waits for three quiet two-second windows in a row.
wait_quiet() {
  local quiet=0 idle
  while [ "$quiet" -lt 3 ]; do
    if pgrep -x cargo >/dev/null || pgrep -x rustc >/dev/null; then
      quiet=0
      sleep 2
      continue
    fi
    idle=$(cpu_idle)
    if [ "$idle" -ge 90 ]; then quiet=$((quiet + 1)); else quiet=0; fi
  done
}

# run NAME ARGS...: one run of juxta-load --mode xmpp.
run() {
  local name="$1"
  shift
  wait_quiet
  {
    printf '\n### %s\n$ juxta-load --mode xmpp %s\n' "$name" "$*"
  } | tee -a "$out/report.txt"
  "$load" --mode xmpp --json "$@" 2>>"$out/stderr.txt" >"$out/$name.json"
  jq -r '
    def ms: . * 100 | round / 100;
    "  logged in \(.logged_in)/\(.subscribers) (\(.login_stage)): RSS \(.server_rss_kib_before_login) -> \(.server_rss_kib_logged_in) KiB = \(.server_rss_kib_per_idle_session * 10 | round / 10) KiB per idle session",
    (select(.published != null) |
      "  published \(.published)/\(.items) over \(.publisher) x\(.publishers) at \(.publish_rate | round)/s (target \(.target_rate)); publish RTT p50 \(.publish_latency_ms.p50 | ms) p99 \(.publish_latency_ms.p99 | ms) ms",
      "  delivered \(.deliveries)/\(.expected_deliveries) in \(.delivery_seconds * 100 | round / 100) s = \(.deliveries_per_second | round)/s; latency p50 \(.latency_ms.p50 | ms) p99 \(.latency_ms.p99 | ms) max \(.latency_ms.max | ms) ms",
      "  lost \(.lost) dup \(.duplicates) errors \(.subscriber_errors.total); CPU server \(.server_cpu_seconds * 10 | round / 10) s, tool \(.load_tool_cpu_seconds * 10 | round / 10) s")
  ' "$out/$name.json" | tee -a "$out/report.txt"
}

{
  echo "# XMPP fan-out, $(date -u +%FT%TZ), $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "# $(prosodyctl about 2>/dev/null | grep -m1 '^Prosody')"
} | tee "$out/report.txt"

for r in $(seq 1 "$repeats"); do
  # juxta, S = 1000: as fast as one XMPP publisher goes, four publishers, eight REST publishers.
  run "juxta-s1000-max-xmpp-$r" -s 1000 -m 1000 --rate 0
  run "juxta-s1000-max-xmpp4-$r" -s 1000 -m 2000 --rate 0 -p 4
  run "juxta-s1000-max-rest8-$r" -s 1000 -m 2000 --rate 0 --publisher rest -p 8
  # Sustained 150k and 100k deliveries/s.
  run "juxta-s1000-r150-xmpp-$r" -s 1000 -m 1500 --rate 150
  run "juxta-s1000-r150-rest-$r" -s 1000 -m 1500 --rate 150 --publisher rest -p 4
  run "juxta-s1000-r100-xmpp-$r" -s 1000 -m 1000 --rate 100
  # Prosody, S = 1000: as fast as it goes, and at a rate it sustains.
  run "prosody-s1000-max-xmpp-$r" --server prosody -s 1000 -m 100 --rate 0 --drain-timeout 120
  run "prosody-s1000-r5-xmpp-$r" --server prosody -s 1000 -m 50 --rate 5 --drain-timeout 120
done

# S = 10 000: one publish per second (juxta) or every five seconds (Prosody); the latency max
# is the time from a publish to the last of its 10 000 deliveries. The same runs give the
# memory per idle session at S = 10 000.
run juxta-s10000-single -s 10000 -m 10 --rate 1 --connect-batch 500
run prosody-s10000-single --server prosody -s 10000 -m 3 --rate 0.2 --connect-batch 500 --drain-timeout 120

# Memory per idle authenticated session, and what each negotiation step costs juxta.
for s in 1000 10000; do
  run "juxta-idle-$s" -s "$s" --idle-rss --connect-batch 500
  run "prosody-idle-$s" --server prosody -s "$s" --idle-rss --connect-batch 500
done
for stage in stream tls authenticated; do
  run "juxta-idle-10000-$stage" -s 10000 --idle-rss --connect-batch 500 --login-stage "$stage"
done
echo "results in $out"

#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it: formatting, lints, docs, then every test.
# Installs or starts what the tests need by itself; safe to run on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# CI runs in a fresh clone each time: keep compiled dependencies outside it.
if [ "${CI:-}" = "true" ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR=/var/tmp/juxta-ci-target
fi

if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install Rust (https://rustup.rs) first" >&2
  exit 1
fi
if command -v rustup >/dev/null; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
  done
fi

# Interop peers we did not write: slixmpp (an XMPP client library) in a virtualenv.
if [ "${CI:-}" = "true" ]; then
  venv="${JUXTA_INTEROP_VENV:-/var/tmp/juxta-ci-venv}"
else
  venv="${JUXTA_INTEROP_VENV:-${CARGO_TARGET_DIR:-target}/interop-venv}"
fi
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
if ! "$venv/bin/python" -c "import slixmpp" 2>/dev/null; then
  log "installing interop peers into $venv"
  command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-venv; }
  python3 -m venv "$venv" || { apt-get update -qq && apt-get install -y -qq python3-venv && python3 -m venv "$venv"; }
  "$venv/bin/pip" install -q --disable-pip-version-check "slixmpp==1.17.0"
fi
export JUXTA_INTEROP_PYTHON="$venv/bin/python"

# Node.js peers from npm, pinned by tests/interop/package-lock.json: xmpp.js (@xmpp/client),
# the client the XMPP-over-WebSocket tests drive, and js-libp2p with gossipsub, the peer the
# overlay interop test (tests/tests/overlay_js.rs) joins a pipe with; Node.js and npm from
# Debian when missing. js-libp2p is ESM-only, hence import() rather than require().
if ! command -v npm >/dev/null; then
  log "installing Node.js and npm from Debian"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm
fi
if ! (cd tests/interop && node --experimental-websocket -e "require('@xmpp/client');
    Promise.all([import('libp2p'), import('@chainsafe/libp2p-gossipsub'), import('cborg')])
      .catch(() => process.exit(1))" 2>/dev/null); then
  log "installing xmpp.js and js-libp2p into tests/interop/node_modules"
  (cd tests/interop && npm ci --no-audit --no-fund --loglevel=error)
fi

# Prosody, the XMPP server the external component tests (tests/tests/xmpp_component.rs) attach
# juxta to. Installed from Debian when missing and we are root; otherwise those tests print that
# they are skipped (and fail under CI=true). The tests run their own Prosody on free ports, so a
# system-wide service the package may start is stopped and disabled.
install_prosody() {
  if command -v prosody >/dev/null && command -v prosodyctl >/dev/null; then
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "prosody is not installed and this is not root: the Prosody tests will say they are skipped" >&2
    return 0
  fi
  log "installing prosody from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prosody
  service prosody stop >/dev/null 2>&1 || true
  systemctl disable --now prosody >/dev/null 2>&1 || true
}
install_prosody

# The overlay's NAT end-to-end test (tests/tests/overlay_nat.rs) builds routers in network
# namespaces (tests/nat/topology.sh) with iproute2 and nftables and checks them with ping; it
# needs root. The tools are installed from Debian when missing and we are root; otherwise that
# test prints that it is skipped (and fails under CI=true).
install_nat_tools() {
  if [ "$(id -u)" != 0 ]; then
    return 0
  fi
  local missing=()
  command -v ip >/dev/null || missing+=(iproute2)
  command -v nft >/dev/null || missing+=(nftables)
  command -v ping >/dev/null || missing+=(iputils-ping)
  if [ "${#missing[@]}" = 0 ]; then
    return 0
  fi
  log "installing ${missing[*]} from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
}
install_nat_tools

# Redis, the engine several instances share (core's Redis store tests and
# tests/tests/engine.rs start their own redis-server processes on free ports). From Debian
# when missing and we are root; otherwise those tests say they are skipped (and fail under
# CI=true). A system-wide service the package may start is stopped and disabled.
install_redis() {
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "redis-server is not installed and this is not root: the Redis tests will say they are skipped" >&2
    return 0
  fi
  log "installing redis-server from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools
  service redis-server stop >/dev/null 2>&1 || true
  systemctl disable --now redis-server >/dev/null 2>&1 || true
}
install_redis

log "deploy/: validating compose, kustomize, systemd, Prometheus and Grafana files"
bash tests/deploy/check.sh

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

log "build the juxta binary the end-to-end tests spawn"
cargo build -p juxta-gateway --bin juxta

log "cargo test"
cargo test --workspace

# Fuzzing: the stream decoder's cargo-fuzz target (bridge-xmpp/fuzz) for a bounded time.
# A crash (panic, or frames that depend on how the input was split) fails the run.
# JUXTA_FUZZ_SECONDS sets the time (default 60); 0 skips.
fuzz_decoder() {
  local seconds="${JUXTA_FUZZ_SECONDS:-60}"
  if [ "$seconds" = 0 ]; then
    log "fuzzing skipped: JUXTA_FUZZ_SECONDS=0"
    return
  fi
  local fuzz_dir="$PWD/bridge-xmpp/fuzz" target corpus artifacts
  # Like the target dir and the venv: in CI, tools, builds and the growing corpus live
  # outside the fresh clone so later runs reuse them.
  if [ "${CI:-}" = "true" ]; then
    local tools="${JUXTA_CI_TOOLS:-/var/tmp/juxta-ci-tools}"
    export PATH="$tools/bin:$PATH"
    if ! cargo fuzz --version >/dev/null 2>&1; then
      log "installing cargo-fuzz into $tools"
      CARGO_INSTALL_ROOT="$tools" cargo install cargo-fuzz --locked --quiet
    fi
    target=/var/tmp/juxta-ci-fuzz-target
    corpus=/var/tmp/juxta-ci-fuzz/corpus/decoder
    artifacts=/var/tmp/juxta-ci-fuzz/artifacts/decoder/
  else
    if ! cargo fuzz --version >/dev/null 2>&1; then
      log "installing cargo-fuzz into ~/.cargo/bin"
      cargo install cargo-fuzz --locked --quiet
    fi
    target="$fuzz_dir/target"
    corpus="$fuzz_dir/corpus/decoder"
    artifacts="$fuzz_dir/artifacts/decoder/"
  fi
  mkdir -p "$corpus" "$artifacts"
  # cargo-fuzz passes unstable flags (-Z…) to rustc: nightly when installed, otherwise the
  # stable toolchain told to accept them.
  local cargo=(env RUSTC_BOOTSTRAP=1 cargo)
  case "$(rustup toolchain list 2>/dev/null || true)" in
    *nightly*) cargo=(cargo +nightly) ;;
  esac
  log "fuzzing the stream decoder for ${seconds}s (${cargo[*]} fuzz)"
  # --sanitizer none: the workspace denies unsafe code, and what the target looks for
  # (panics, split-dependent results) needs no sanitizer; AddressSanitizer cut throughput
  # about six-fold here (17k to 3k inputs/s). The seeds are read as a second corpus
  # directory; new inputs go to the first.
  "${cargo[@]}" fuzz run --fuzz-dir "$fuzz_dir" --target-dir "$target" --sanitizer none \
    decoder "$corpus" "$fuzz_dir/seeds/decoder" -- \
    -max_total_time="$seconds" -timeout=10 -dict="$fuzz_dir/decoder.dict" \
    -artifact_prefix="$artifacts" -print_final_stats=1
}
fuzz_decoder

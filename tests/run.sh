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

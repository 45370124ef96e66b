#!/usr/bin/env bash
# Validates deploy/ on a machine without a container engine or a cluster: every file goes
# through the real tool that reads it wherever that tool runs without a daemon —
#   compose.yaml          docker compose config (or docker-compose v1 from Debian)
#   k8s/                  kubectl kustomize (or kustomize; kubernetes-client from Debian)
#   systemd/juxta.service systemd-analyze verify, and security with an exposure ceiling
#   prometheus/           promtool check config, check rules, test rules (Debian's prometheus)
#   prosody/              prosodyctl check config
#   juxta configuration   juxta serve --print-config of the image's, the compose gateways',
#                         the Kubernetes and the systemd unit's configuration (juxta is built
#                         with cargo)
#   metrics               the names alerts and dashboard use, against a running juxta's /metrics
#   health checks         the Dockerfile's HEALTHCHECK and compose's readiness check, run against
#                         that juxta on a throwaway Redis, with Redis up and then down
# plus YAML (no duplicate keys) and JSON parsing and cross-file consistency (tests/deploy/lint.py).
# Missing tools are installed from Debian when running as root; a check whose tool cannot be had
# says it is SKIPPED, and under CI=true a skipped check fails the run. Exits non-zero on any
# failure. JUXTA_BIN=path uses that juxta binary instead of building one.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD

failed=()
skipped=()
work=$(mktemp -d)
server_pid=
redis_pid=
cleanup() {
  for pid in $server_pid $redis_pid; do
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  rm -rf "$work"
}
trap cleanup EXIT

title() { printf '\n--> %s\n' "$*"; }
indent() { sed 's/^/    /'; }
pass() { printf '    ok: %s\n' "$*"; }
fail() {
  printf '    FAILED: %s\n' "$1"
  failed+=("$1")
}
skip() {
  printf '    SKIPPED: %s\n' "$1"
  skipped+=("$1")
}

# run NAME CMD...: runs CMD, shows its output indented, records a failure.
run() {
  local name=$1
  shift
  if "$@" >"$work/out" 2>&1; then
    indent <"$work/out"
    pass "$name"
  else
    indent <"$work/out"
    fail "$name"
  fi
}

# Installs Debian packages when root with apt-get; says why not otherwise.
apt_updated=false
apt_install() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "    (not root with apt-get: cannot install $*)"
    return 1
  fi
  if [ "$apt_updated" = false ]; then
    apt-get update -qq >/dev/null || return 1
    apt_updated=true
  fi
  echo "    installing $* from Debian"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# A package whose installation enables a system service (prometheus, prosody): we only want
# its tools.
stop_service() {
  service "$1" stop >/dev/null 2>&1 || true
  systemctl disable --now "$1" >/dev/null 2>&1 || true
}

# --- Python with PyYAML: the YAML and consistency checks -------------------------------------
title "YAML: every file in deploy/ parses, without duplicate keys"
python=
for p in python3 /usr/bin/python3; do
  if command -v "$p" >/dev/null && "$p" -c 'import yaml' 2>/dev/null; then
    python=$p
    break
  fi
done
if [ -z "$python" ] && apt_install python3 python3-yaml; then
  python=/usr/bin/python3
fi
if [ -z "$python" ]; then
  fail "python3 with PyYAML (Debian python3-yaml) is needed for the YAML checks"
else
  mapfile -t yaml_files < <(find deploy -name '*.yaml' -o -name '*.yml' | sort)
  run "YAML syntax ($("$python" -c 'import yaml; print("PyYAML", yaml.__version__)'))" \
    "$python" tests/deploy/lint.py yaml "${yaml_files[@]}"
fi
lint() { "$python" tests/deploy/lint.py "$@"; }

title "JSON: the Grafana dashboard"
if [ -n "$python" ]; then
  run "python3 -m json.tool deploy/grafana/juxta-dashboard.json" \
    "$python" -m json.tool deploy/grafana/juxta-dashboard.json /dev/null
  run "dashboard structure" lint dashboard deploy/grafana/juxta-dashboard.json
fi

title "Dockerfile: what can be checked without building (no container engine here)"
[ -n "$python" ] && run "Dockerfile and .dockerignore" lint dockerfile

# --- compose ----------------------------------------------------------------------------------
title "compose.yaml: docker compose config"
compose=()
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null || apt_install docker-compose; then
  compose=(docker-compose)
fi
if [ "${#compose[@]}" = 0 ]; then
  skip "compose.yaml: neither docker compose nor docker-compose is available"
else
  echo "    $("${compose[@]}" version 2>/dev/null | head -1)"
  if "${compose[@]}" -f deploy/compose.yaml --profile monitoring config >"$work/compose.yaml" 2>"$work/err" ||
    "${compose[@]}" -f deploy/compose.yaml config >"$work/compose.yaml" 2>"$work/err"; then
    indent <"$work/err"
    pass "${compose[*]} config"
    [ -n "$python" ] && run "compose services agree with each other" lint compose "$work/compose.yaml"
  else
    indent <"$work/err"
    fail "${compose[*]} -f deploy/compose.yaml config"
  fi
fi

# --- Kubernetes -------------------------------------------------------------------------------
title "k8s/: kubectl kustomize"
kustomize=()
if command -v kubectl >/dev/null || apt_install kubernetes-client; then
  kustomize=(kubectl kustomize)
elif command -v kustomize >/dev/null; then
  kustomize=(kustomize build)
fi
if [ "${#kustomize[@]}" = 0 ]; then
  skip "k8s/: neither kubectl nor kustomize is available (Debian: kubernetes-client)"
else
  if [ "${kustomize[0]}" = kubectl ]; then
    echo "    $(kubectl version --client 2>/dev/null | grep -iE 'client|kustomize' | tr '\n' ' ')"
  fi
  if "${kustomize[@]}" deploy/k8s >"$work/k8s.yaml" 2>"$work/err"; then
    indent <"$work/err"
    pass "${kustomize[*]} deploy/k8s ($(grep -c '^kind:' "$work/k8s.yaml") objects)"
    [ -n "$python" ] && run "Kubernetes objects agree with each other" lint k8s "$work/k8s.yaml"
  else
    indent <"$work/err"
    fail "${kustomize[*]} deploy/k8s"
  fi
fi

# --- systemd ----------------------------------------------------------------------------------
title "systemd/juxta.service: systemd-analyze verify and security"
if command -v systemd-analyze >/dev/null || apt_install systemd; then
  echo "    $(systemd-analyze --version | head -1)"
  # verify insists that ExecStart= names an executable: check a copy of the unit whose
  # ExecStart points at a stand-in in a temporary directory, everything else unchanged.
  unit_dir="$work/systemd"
  mkdir -p "$unit_dir"
  printf '#!/bin/sh\nexit 0\n' >"$unit_dir/juxta"
  chmod 755 "$unit_dir/juxta"
  sed "s|^ExecStart=/usr/local/bin/juxta |ExecStart=$unit_dir/juxta |" \
    deploy/systemd/juxta.service >"$unit_dir/juxta.service"
  if ! grep -q "^ExecStart=$unit_dir/juxta serve --config /etc/juxta/juxta.toml$" "$unit_dir/juxta.service"; then
    fail "juxta.service: ExecStart must be /usr/local/bin/juxta serve --config /etc/juxta/juxta.toml"
  fi
  # verify reports unknown keys and bad values as warnings with exit status 0: any output fails.
  systemd-analyze verify --man=no "$unit_dir/juxta.service" >"$work/out" 2>&1
  status=$?
  indent <"$work/out"
  if [ "$status" = 0 ] && [ ! -s "$work/out" ]; then
    pass "systemd-analyze verify (no warnings)"
  else
    fail "systemd-analyze verify deploy/systemd/juxta.service"
  fi
  # The exposure score (0 safest .. 10) must stay at or below 2.0 (threshold is in tenths).
  if systemd-analyze security --offline=yes --threshold=20 "$unit_dir/juxta.service" >"$work/out" 2>&1; then
    pass "systemd-analyze security: $(grep -o 'Overall exposure level.*' "$work/out" | sed 's/ for [^:]*:/:/')"
  else
    grep -v '✓' "$work/out" | indent
    fail "systemd-analyze security: exposure above 2.0"
  fi
else
  skip "systemd/juxta.service: systemd-analyze is not available (Debian: systemd)"
fi

# --- Prometheus -------------------------------------------------------------------------------
title "prometheus/: promtool check config, check rules, test rules"
if ! command -v promtool >/dev/null && apt_install prometheus; then
  stop_service prometheus
fi
if command -v promtool >/dev/null; then
  echo "    $(promtool --version 2>&1 | head -1)"
  run "promtool check config" promtool check config deploy/prometheus/prometheus.yml
  run "promtool check rules" promtool check rules deploy/prometheus/alerts.yml
  run "promtool test rules" promtool test rules deploy/prometheus/alerts.test.yml
else
  skip "prometheus/: promtool is not available (Debian: prometheus)"
fi

# --- Prosody ----------------------------------------------------------------------------------
title "prosody/prosody.cfg.lua: prosodyctl check config"
if ! command -v prosodyctl >/dev/null && apt_install prosody; then
  stop_service prosody
fi
if command -v prosodyctl >/dev/null; then
  echo "    $(prosodyctl about 2>/dev/null | head -1)"
  run "prosodyctl check config" env JUXTA_COMPONENT_SECRET=check \
    prosodyctl --config "$ROOT/deploy/prosody/prosody.cfg.lua" check config
else
  skip "prosody/: prosodyctl is not available (Debian: prosody)"
fi

# --- The juxta binary: configuration, metrics, healthcheck ------------------------------------
title "juxta: the deployment's configuration loads, its metrics exist, the image healthcheck works"
juxta=${JUXTA_BIN:-}
if [ -z "$juxta" ] && command -v cargo >/dev/null; then
  echo "    cargo build -p juxta-gateway --bin juxta"
  if cargo build --quiet -p juxta-gateway --bin juxta >"$work/out" 2>&1; then
    juxta="${CARGO_TARGET_DIR:-target}/debug/juxta"
  else
    tail -20 "$work/out" | indent
    fail "cargo build -p juxta-gateway --bin juxta"
  fi
elif [ -z "$juxta" ]; then
  skip "juxta configuration, metrics and healthcheck: no cargo to build juxta (or set JUXTA_BIN)"
fi
if [ -n "$juxta" ] && [ -n "$python" ]; then
  case "$juxta" in /*) ;; *) juxta="$ROOT/$juxta" ;; esac
  "$juxta" --version 2>/dev/null | indent
  # Only the variables of the case at hand: a JUXTA_* of the caller's shell must not leak in.
  clean_env=(env -i "PATH=$PATH" "HOME=$work")
  print_config() {
    local file=$1
    shift
    "${clean_env[@]}" "$@" "$juxta" serve --print-config --config "$file" >/dev/null
  }
  run "the image's configuration (deploy/container.toml)" print_config deploy/container.toml
  run "deploy/juxta.example.toml" print_config deploy/juxta.example.toml
  mapfile -t unit_env < <(sed -n 's/^Environment=//p' deploy/systemd/juxta.service)
  run "the systemd unit's configuration (juxta.example.toml and the unit's Environment=)" \
    print_config deploy/juxta.example.toml "${unit_env[@]}"
  run "the Kubernetes configuration (k8s/juxta.toml and the Secret's variables)" \
    print_config deploy/k8s/juxta.toml JUXTA_ADMIN_KEY=0123456789abcdef0123 \
    JUXTA_AUTH__JWT_SECRET=0123456789abcdef0123456789abcdef JUXTA_STORE__URL=redis://redis:6379
  if [ -s "$work/compose.yaml" ]; then
    for g in juxta1 juxta2 juxta3; do
      mapfile -t genv < <(lint compose-env "$work/compose.yaml" "$g")
      run "the configuration of compose's $g (the image's file and its environment)" \
        print_config deploy/container.toml "${genv[@]}"
    done
  fi

  # A gateway on free loopback ports, on a throwaway Redis when redis-server is installed (else
  # a memory store): its /metrics says which names the alerts and the dashboard may use, the
  # Dockerfile's HEALTHCHECK (liveness) and compose's healthcheck (readiness) must pass against
  # it, readiness must fail once Redis is gone, and liveness once juxta is gone.
  read -r http_port xmpp_port p2p_port redis_port < <("$python" -c '
import socket
ss = [socket.socket() for _ in range(4)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
  store_env=(JUXTA_STORE__BACKEND=memory)
  redis_major=$(redis-server --version 2>/dev/null | sed -n 's/.* v=\([0-9]*\)\..*/\1/p')
  if [ "${redis_major:-0}" -ge 7 ]; then
    mkdir -p "$work/redis"
    redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$work/redis" --save '' \
      --appendonly no >"$work/redis.log" 2>&1 &
    redis_pid=$!
    store_env=(JUXTA_STORE__BACKEND=redis "JUXTA_STORE__URL=redis://127.0.0.1:$redis_port"
      JUXTA_STORE__TIMEOUT_SECS=1)
    echo "    $(redis-server --version | cut -d' ' -f1-3) on 127.0.0.1:$redis_port for the engine"
  else
    echo "    (no redis-server 7 here: juxta runs on a memory store; engine metrics are checked in the sources)"
  fi
  "${clean_env[@]}" "${store_env[@]}" "$juxta" serve --data-dir "$work/data" \
    --http "127.0.0.1:$http_port" --xmpp "127.0.0.1:$xmpp_port" \
    --p2p "/ip4/127.0.0.1/tcp/$p2p_port" >"$work/serve.log" 2>&1 &
  server_pid=$!
  if ! lint get "http://127.0.0.1:$http_port/readyz" >"$work/out" 2>&1; then
    indent <"$work/out"
    tail -20 "$work/serve.log" | indent
    fail "juxta serve (${store_env[0]}) was not ready within 10 s"
  else
    lint get "http://127.0.0.1:$http_port/metrics" "$work/metrics.txt"
    run "metric names in alerts.yml and the dashboard exist ($(grep -c '^# TYPE' "$work/metrics.txt") families exported by juxta on ${store_env[0]#*=})" \
      lint metrics --exported "$work/metrics.txt"
    mapfile -t hc < <(lint healthcheck "$http_port")
    if [ "${#hc[@]}" = 0 ]; then
      fail "no HEALTHCHECK CMD [...] in deploy/Dockerfile"
      hc=(false)
    fi
    run "the Dockerfile's HEALTHCHECK (${hc[0]}, /dev/tcp, GET /healthz) passes against juxta" "${hc[@]}"
    rc=()
    if [ -s "$work/compose.yaml" ]; then
      mapfile -t rc < <(lint compose-healthcheck "$work/compose.yaml" juxta1 "$http_port")
      run "compose's gateway healthcheck (GET /readyz) passes against juxta" "${rc[@]}"
    fi
    if [ -n "$redis_pid" ]; then
      kill "$redis_pid" 2>/dev/null
      wait "$redis_pid" 2>/dev/null
      redis_pid=
      ready_failed=false
      for _ in $(seq 50); do
        if [ "${#rc[@]}" -gt 0 ] && ! "${rc[@]}" >/dev/null 2>&1; then
          ready_failed=true
          break
        fi
        sleep 0.2
      done
      if [ "${#rc[@]}" -gt 0 ] && [ "$ready_failed" = true ]; then
        pass "with Redis stopped, compose's healthcheck fails (/readyz answers 503)"
      elif [ "${#rc[@]}" -gt 0 ]; then
        fail "compose's healthcheck still passes 10 s after Redis stopped"
      fi
      if "${hc[@]}" >/dev/null 2>&1; then
        pass "with Redis stopped, the image's HEALTHCHECK (liveness) still passes"
      else
        fail "the image's HEALTHCHECK fails while only Redis is down: it would restart a healthy juxta"
      fi
    fi
    kill "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
    server_pid=
    if "${hc[@]}" >/dev/null 2>&1; then
      fail "the HEALTHCHECK still passes with juxta stopped: it checks nothing"
    else
      pass "the HEALTHCHECK fails once juxta is stopped"
    fi
  fi
fi
if [ -n "$python" ] && [ ! -s "$work/metrics.txt" ]; then
  # Without a running juxta the names are still checked against the sources.
  run "metric names in alerts.yml and the dashboard exist in the sources" lint metrics
fi

# --- Summary ----------------------------------------------------------------------------------
printf '\n'
if [ "${#skipped[@]}" != 0 ]; then
  printf 'deploy/: SKIPPED (tool missing, not validated): %s\n' "${skipped[@]}"
  if [ "${CI:-}" = true ]; then
    failed+=("skipped checks under CI=true")
  fi
fi
if [ "${#failed[@]}" != 0 ]; then
  printf 'deploy/: FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "deploy/: all checks passed"

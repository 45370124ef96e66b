#!/usr/bin/env bash
# A small NAT laboratory in network namespaces, for the overlay's NAT end-to-end test
# (tests/tests/overlay_nat.rs). Needs root, iproute2 and nftables.
#
#   topology.sh up     PREFIX [OCTET]   build it (a leftover of the same PREFIX is removed first)
#   topology.sh verify PREFIX [OCTET]   check reachability with ping (exit 1 if NAT leaks)
#   topology.sh down   PREFIX           remove it; safe to run any number of times
#
# The picture, with OCTET = x (default 77):
#
#   root namespace: bridge PREFIX-br, 10.x.0.1/24  <- the "public segment"; the gateway
#        |                       |                    listens here
#   PREFIX-r1 (router)      PREFIX-r2 (router)     wan 10.x.0.11 / 10.x.0.12, lan .1,
#        | lan 192.168.1.1       | lan 192.168.2.1   masquerade out of wan, new inbound
#   PREFIX-p1 (peer)        PREFIX-p2 (peer)       connections from wan dropped
#     eth0 192.168.1.2        eth0 192.168.2.2     default route via the router
#
# Each router also has a route to the other router's private network through the other
# router, as if the "internet" knew the way: so an inbound connection fails because of the NAT
# firewall, not for want of a route. The root namespace gets no route to the private networks
# (the internet has none). PREFIX (a lowercase letter and up to 9 lowercase letters or digits)
# names everything and OCTET picks the public /24, so parallel runs with different values do
# not meet. Private addresses live inside the namespaces and may repeat between runs.
set -euo pipefail

usage() {
  echo "usage: $0 up|verify|down PREFIX [OCTET]" >&2
  exit 2
}

[ $# -ge 2 ] || usage
action=$1
prefix=$2
octet=${3:-77}
[[ $prefix =~ ^[a-z][a-z0-9]{0,9}$ ]] || {
  echo "PREFIX must be a lowercase letter and up to 9 lowercase letters or digits: $prefix" >&2
  exit 2
}
[[ $octet =~ ^[0-9]+$ ]] && [ "$octet" -ge 1 ] && [ "$octet" -le 254 ] || {
  echo "OCTET must be 1..254: $octet" >&2
  exit 2
}

bridge="$prefix-br"
public="10.$octet.0"

# Router i: namespace, root-side veth, public and private addresses.
router_ns() { echo "$prefix-r$1"; }
peer_ns() { echo "$prefix-p$1"; }
root_veth() { echo "$prefix-v$1"; }
router_public() { echo "$public.1$1"; }
lan() { echo "192.168.$1"; }

down() {
  local i
  for i in 1 2; do
    ip netns del "$(peer_ns "$i")" 2>/dev/null || true
    ip netns del "$(router_ns "$i")" 2>/dev/null || true
    # Deleting the router namespace destroys the veth pair; this is for a half-built run.
    ip link del "$(root_veth "$i")" 2>/dev/null || true
  done
  ip link del "$bridge" 2>/dev/null || true
}

# The router's firewall: source NAT out of the public side; from the public side only
# replies (established, related) pass, to the router itself or through it. New inbound
# connections are dropped silently, as a home router does.
router_rules() {
  cat <<'EOF'
table inet juxta_nat {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" masquerade
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "wan" ct state established,related accept
    iifname "wan" drop
  }
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "wan" ct state established,related accept
    iifname "wan" drop
  }
}
EOF
}

up() {
  for tool in ip nft; do
    command -v "$tool" >/dev/null || {
      echo "$tool is missing (apt-get install iproute2 nftables)" >&2
      exit 1
    }
  done
  down
  if ip -4 -o addr show | grep -q " inet $public\."; then
    echo "$public.0/24 is already in use on this host; choose another OCTET" >&2
    exit 1
  fi
  # A failure half way (set -e exits) leaves nothing behind.
  trap '[ $? = 0 ] || down' EXIT

  ip link add "$bridge" type bridge
  ip addr add "$public.1/24" dev "$bridge"
  ip link set "$bridge" up

  local i r p other
  for i in 1 2; do
    r=$(router_ns "$i")
    p=$(peer_ns "$i")
    other=$((3 - i))
    ip netns add "$r"
    ip netns add "$p"
    ip -n "$r" link set lo up
    ip -n "$p" link set lo up

    # Public side: a veth from the bridge into the router.
    ip link add "$(root_veth "$i")" type veth peer name wan netns "$r"
    ip link set "$(root_veth "$i")" master "$bridge"
    ip link set "$(root_veth "$i")" up
    ip -n "$r" addr add "$(router_public "$i")/24" dev wan
    ip -n "$r" link set wan up

    # Private side: a veth from the router into the peer.
    ip -n "$r" link add lan type veth peer name eth0 netns "$p"
    ip -n "$r" addr add "$(lan "$i").1/24" dev lan
    ip -n "$r" link set lan up
    ip -n "$p" addr add "$(lan "$i").2/24" dev eth0
    ip -n "$p" link set eth0 up
    ip -n "$p" route add default via "$(lan "$i").1"

    ip netns exec "$r" sysctl -qw net.ipv4.ip_forward=1
    ip -n "$r" route add "$(lan "$other").0/24" via "$(router_public "$other")"
    router_rules | ip netns exec "$r" nft -f -
  done
  trap - EXIT
  echo "NAT topology $prefix up: public $public.0/24 on $bridge, peers in $(peer_ns 1) and $(peer_ns 2)"
}

# Succeeds when `ping` from namespace $1 ("" = root) to $2 gets an answer.
pings() {
  local ns=$1 target=$2
  if [ -z "$ns" ]; then
    ping -c 1 -W 1 "$target" >/dev/null 2>&1
  else
    ip netns exec "$ns" ping -c 1 -W 1 "$target" >/dev/null 2>&1
  fi
}

verify() {
  local failed=0
  expect() {
    local want=$1 from=$2 to=$3 got=no
    pings "$from" "$to" && got=yes
    printf '  %-16s -> %-14s reachable: %-3s (expected %s)\n' "${from:-root}" "$to" "$got" "$want"
    [ "$got" = "$want" ] || failed=1
  }
  echo "NAT topology $prefix: reachability"
  expect yes "$(peer_ns 1)" "$public.1"
  expect yes "$(peer_ns 2)" "$public.1"
  expect yes "$(router_ns 2)" "$public.1"
  expect no "$(router_ns 2)" "$(router_public 1)"
  expect no "" "$(lan 1).2"
  expect no "$(router_ns 2)" "$(lan 1).2"
  expect no "$(peer_ns 2)" "$(lan 1).2"
  expect no "$(peer_ns 1)" "$(lan 2).2"
  [ "$failed" = 0 ] || {
    echo "NAT topology $prefix does not behave as a NAT" >&2
    exit 1
  }
}

case "$action" in
  up) up ;;
  verify) verify ;;
  down) down ;;
  *) usage ;;
esac

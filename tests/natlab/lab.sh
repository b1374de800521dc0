#!/usr/bin/env bash
# A NAT lab in network namespaces (after ../shared/NETLAB.md's reference topology):
#
#   hA 203.0.113.2  -- natA (lan 203.0.113.1/26  | wan0 198.51.100.10) --+
#                                                                         +-- wan bridge 198.51.100.1
#   hB 203.0.113.66 -- natB (lan 203.0.113.65/26 | wan0 198.51.100.20) --+   (rendezvous, relay)
#   hC 203.0.113.194 - natC (lan 203.0.113.193/26 | wan0 198.51.100.40) -+   (only with MODE_C)
#
# usage: lab.sh up PREFIX MODE_A MODE_B [LOSS_PERCENT] [DELAY_MS] [MODE_C]
#        lab.sh down PREFIX
# MODE: cone    port-restricted cone NAT (Linux masquerade, WAN input filtered)
#       sym     symmetric NAT (masquerade random, WAN input filtered)
#       public  no NAT: the host sits on the WAN with a public address (198.51.100.3x)
#       samenat (MODE_B only) hB sits on natA's LAN (203.0.113.3), behind the same NAT as hA
# LOSS_PERCENT drops that share of the packets crossing the WAN bridge (nftables numgen).
# DELAY_MS delays natA's WAN link by that much each way: the kernel has no netem, so the link
# is spliced through delay.py (a userspace relay on two packet sockets, offloads off).
# MODE_C (cone, sym or public) adds a third host hC; it takes index 3 (203.0.113.192/26, WAN
# 198.51.100.40, public 198.51.100.33), leaving 203.0.113.128/26 for a carrier-side network.
# Namespaces: PREFIX-wan, PREFIX-natA, PREFIX-natB, PREFIX-hA, PREFIX-hB (and PREFIX-natC,
# PREFIX-hC).
# IPv6: LAB_V6="A B" gives those sides (cone or sym: behind a NAT router) IPv6 as a home
# router does, with no NAT: the router routes the host's 2001:db8:N::/64 (N = 1 for A, 2 for
# B, 4 for C) and keeps the same stateful firewall (the inet table: new flows from the WAN
# dropped), so peers still punch. The WAN bridge gets 2001:db8:ffff::1 and routes between
# the routers (2001:db8:ffff::10, ::20, ::40). LAB_V4_HOSTS=0 takes the IPv4 address off
# those hosts: IPv6 only. Only documentation ranges are used. `down` removes everything `up` made (also
# after a partial `up`).
set -euo pipefail
cmd=$1 P=$2
ns() { echo "$P-$1"; }

if [ "$cmd" = down ]; then
  for n in hA hB hC natA natB natC wan; do
    pids=$(ip netns pids "$(ns "$n")" 2>/dev/null || true)
    [ -n "$pids" ] && kill $pids 2>/dev/null || true
    ip netns del "$(ns "$n")" 2>/dev/null || true
  done
  exit 0
fi

MA=$3 MB=$4 LOSS=${5:-0} DELAY=${6:-0} MC=${7:-}
here=$(cd "$(dirname "$0")" && pwd)
for n in wan hA hB ${MC:+hC}; do ip netns add "$(ns "$n")"; ip -n "$(ns "$n")" link set lo up; done

# The WAN: a bridge in its own namespace.
W=$(ns wan)
ip -n "$W" link add br0 type bridge
ip -n "$W" link set br0 up
ip -n "$W" addr add 198.51.100.1/24 dev br0
ip netns exec "$W" sysctl -qw net.bridge.bridge-nf-call-iptables=0 2>/dev/null || true
ip netns exec "$W" sysctl -qw net.bridge.bridge-nf-call-ip6tables=0 2>/dev/null || true
ip netns exec "$W" sysctl -qw net.bridge.bridge-nf-call-arptables=0 2>/dev/null || true
if [ "$LOSS" != 0 ]; then
  ip netns exec "$W" nft -f - <<NFT
table bridge lossy {
  chain forward_loss {
    type filter hook forward priority 0; policy accept;
    numgen random mod 100 < $LOSS drop
  }
}
NFT
fi

no_offloads() { # NS IF: MTU-sized frames with real checksums, as on a wire (the relay needs that)
  for f in tx gro gso tso tx-udp-segmentation rx-gro-list rx-udp-gro-forwarding; do
    ip netns exec "$1" ethtool -K "$2" "$f" off >/dev/null 2>&1 || true
  done
}

# wan_port NS IFNAME ADDR [DELAY_MS]: a veth from NS (named IFNAME) into the WAN bridge,
# optionally through the userspace delay relay.
wan_port() {
  local tmp="tw$RANDOM$RANDOM"
  ip link add "$tmp" type veth peer name "${tmp}p"
  ip link set "$tmp" netns "$W"
  ip link set "${tmp}p" netns "$1"
  ip -n "$1" link set "${tmp}p" name "$2"
  ip -n "$1" addr add "$3" dev "$2"
  ip -n "$1" link set "$2" up
  if [ "${4:-0}" = 0 ]; then
    ip -n "$W" link set "$tmp" master br0 up
    return
  fi
  # $tmp (from NS) <- delay.py -> ${tmp}s == ${tmp}b (in the bridge)
  ip -n "$W" link add "${tmp}s" type veth peer name "${tmp}b"
  ip -n "$W" link set "${tmp}b" master br0 up
  ip -n "$W" link set "${tmp}s" up
  ip -n "$W" link set "$tmp" up
  for dev in "$tmp" "${tmp}s" "${tmp}b"; do no_offloads "$W" "$dev"; done
  no_offloads "$1" "$2"
  ip netns exec "$W" python3 -u "$here/delay.py" "$tmp" "${tmp}s" "$4" >/dev/null 2>&1 &
  sleep 0.3  # (bounded: the relay binds two sockets, then loops)
}

# lan_host NAT HOST ADDR GW: a host on the NAT's LAN bridge.
lan_host() {
  local tmp="tl$RANDOM$RANDOM"
  ip link add "$tmp" type veth peer name "${tmp}p"
  ip link set "$tmp" netns "$1"
  ip -n "$1" link set "$tmp" master lan0 up
  ip link set "${tmp}p" netns "$2"
  ip -n "$2" link set "${tmp}p" name eth0
  ip -n "$2" addr add "$3" dev eth0
  ip -n "$2" link set eth0 up
  ip -n "$2" route add default via "$4"
}

# nat SIDE INDEX MODE: a NAT router namespace for hSIDE.
nat() {
  local N; N=$(ns "nat$1")
  local base=$(( $2 * 64 ))
  ip netns add "$N"
  ip -n "$N" link set lo up
  local delay=0
  [ "$1" = A ] && delay=$DELAY
  wan_port "$N" wan0 "198.51.100.$(( 10 + 10 * $2 ))/24" "$delay"
  ip -n "$N" link add lan0 type bridge
  ip -n "$N" link set lan0 up
  ip -n "$N" addr add "203.0.113.$(( base + 1 ))/26" dev lan0
  ip netns exec "$N" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "$N" sysctl -qw net.bridge.bridge-nf-call-iptables=0 2>/dev/null || true
  ip netns exec "$N" sysctl -qw net.bridge.bridge-nf-call-ip6tables=0 2>/dev/null || true
  ip netns exec "$N" sysctl -qw net.bridge.bridge-nf-call-arptables=0 2>/dev/null || true
  local masq="masquerade"
  [ "$3" = sym ] && masq="masquerade random"
  ip netns exec "$N" nft -f - <<NFT
table ip nat {
  chain post {
    type nat hook postrouting priority 100;
    oifname "wan0" $masq
  }
}
table inet filter {
  chain input {
    type filter hook input priority 0; policy accept;
    iifname "wan0" ct state new drop
  }
  chain forward {
    type filter hook forward priority 0; policy accept;
    iifname "wan0" ct state new drop
  }
}
NFT
  lan_host "$N" "$(ns "h$1")" "203.0.113.$(( base + 2 ))/26" "203.0.113.$(( base + 1 ))"
}

side() { # SIDE INDEX MODE
  case "$3" in
    cone|sym) nat "$1" "$2" "$3" ;;
    public) wan_port "$(ns "h$1")" eth0 "198.51.100.$(( 30 + $2 ))/24" ;;
    samenat)
      [ "$1" = B ] || { echo "samenat is for side B" >&2; exit 2; }
      lan_host "$(ns natA)" "$(ns hB)" 203.0.113.3/26 203.0.113.1 ;;
    *) echo "unknown mode $3" >&2; exit 2 ;;
  esac
}
side A 0 "$MA"
side B 1 "$MB"
if [ -n "$MC" ]; then side C 3 "$MC"; fi

if [ -n "${LAB_V6:-}" ]; then
  ip netns exec "$W" sysctl -qw net.ipv6.conf.all.forwarding=1
  ip -n "$W" addr add 2001:db8:ffff::1/64 dev br0 nodad
  for s in $LAB_V6; do
    case $s in A) i=0 ;; B) i=1 ;; C) i=3 ;; *) echo "LAB_V6: unknown side $s" >&2; exit 2 ;; esac
    N=$(ns "nat$s") H=$(ns "h$s") net="2001:db8:$(( i + 1 ))" wan="2001:db8:ffff::$(( 10 + 10 * i ))"
    ip netns list | grep -q "^$N" || { echo "LAB_V6: side $s has no NAT router" >&2; exit 2; }
    ip netns exec "$N" sysctl -qw net.ipv6.conf.all.forwarding=1
    ip -n "$N" addr add "$wan/64" dev wan0 nodad
    ip -n "$N" addr add "$net::1/64" dev lan0 nodad
    ip -n "$N" -6 route add default via 2001:db8:ffff::1
    ip -n "$H" addr add "$net::2/64" dev eth0 nodad
    ip -n "$H" -6 route add default via "$net::1"
    ip -n "$W" -6 route add "$net::/64" via "$wan"
    if [ "${LAB_V4_HOSTS:-1}" = 0 ]; then ip -n "$H" -4 addr flush dev eth0; fi
  done
  # Neighbour discovery speaks from link-local addresses, which stay tentative for their
  # duplicate address detection (about a second) after a link comes up: wait that out, or
  # the first packets of a test are held (bounded: 5 s per namespace).
  for n in wan $(for s in $LAB_V6; do echo "nat$s h$s"; done); do
    for _ in $(seq 50); do
      [ -z "$(ip -n "$(ns "$n")" -6 addr show tentative)" ] && break
      sleep 0.1
    done
  done
fi

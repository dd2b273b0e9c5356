#!/usr/bin/env bash
# A test network on one machine: an origin host, six cache hosts and N worker hosts, each
# a network namespace, every one joined by its own veth link to a router namespace.
# Link delays like S3 and like an availability zone, bandwidth limits, and faults on
# demand. docs/network.md draws it and says how to use it. Run as root.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: testnet.sh [--prefix P] [--subnet 198.18.X.0/24] COMMAND ...

commands:
  up [--workers N] [--origin-delay T] [--origin-jitter T] [--origin-rate R]
     [--cache-delay T] [--cache-jitter T] [--cache-rate R]
     [--worker-delay T] [--worker-rate R]
                      make the network (T: 20ms, 250us, 0; R: a tc rate such as 1gbit,
                      or none)
  down                remove everything `up` made (also after a half-failed `up`)
  status              namespaces, addresses, links, faults
  hosts               one line per host: NAME NAMESPACE ADDRESS
  addr HOST           the address of HOST (origin, cache1..cache6, worker1..workerN)
  exec HOST CMD...    run CMD in HOST's namespace
  fault partition HOST        drop everything to and from HOST
  fault slow HOST T           HOST's link delay becomes T each way
  fault loss HOST|all PCT     drop PCT% (e.g. 1%) of packets each way on the link(s)
  fault throttle-origin R     the origin's link rate becomes R each way
  fault clear [HOST]          back to how `up` made it (one host, or all)

defaults: prefix lt (env LODE_TESTNET_PREFIX), subnet 198.18.0.0/24
(env LODE_TESTNET_SUBNET), 3 workers, origin 20ms +-5ms each way at 1gbit, caches
200us each way at 10gbit, workers no delay and no limit. State lives in
/run/lode-testnet/PREFIX (env LODE_TESTNET_RUN).
EOF
}

die() {
  echo "testnet.sh: $*" >&2
  exit 1
}

here=$(cd "$(dirname "$0")" && pwd)
prefix=${LODE_TESTNET_PREFIX:-lt}
subnet=${LODE_TESTNET_SUBNET:-198.18.0.0/24}
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=${2:?--prefix needs a value}; shift 2 ;;
    --subnet) subnet=${2:?--subnet needs a value}; shift 2 ;;
    -h | --help | help) usage; exit 0 ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { usage >&2; exit 2; }
cmd=$1
shift

# Names: every namespace is PREFIX-HOST; interfaces live only inside them, so nothing of
# ours is ever in the caller's namespace, and two prefixes never collide.
[[ $prefix =~ ^[a-z][a-z0-9]{0,15}$ ]] || die "prefix $prefix: 1 to 16 of a-z 0-9, starting with a letter"
# A /24 of 198.18.0.0/15, the block set aside for benchmarking (RFC 2544): nothing in it
# is routed anywhere, and no host here has a default route.
[[ $subnet =~ ^198\.(18|19)\.([0-9]{1,3})\.0/24$ ]] || die "subnet $subnet: must be a /24 in 198.18.0.0/15, like 198.18.7.0/24"
((BASH_REMATCH[2] <= 255)) || die "subnet $subnet: bad third octet"
net=${subnet%.0/24}
state=${LODE_TESTNET_RUN:-/run/lode-testnet}/$prefix
router=$prefix-router
marker="lode-testnet $prefix"

# Time (20ms, 250us, 1s, 0) -> microseconds.
usecs() {
  local t=$1
  case "$t" in
    0) echo 0 ;;
    *us) [[ ${t%us} =~ ^[0-9]+$ ]] && echo "${t%us}" || die "bad time $t" ;;
    *ms) [[ ${t%ms} =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v v="${t%ms}" 'BEGIN{printf "%d\n", v*1000}' || die "bad time $t" ;;
    *s) [[ ${t%s} =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v v="${t%s}" 'BEGIN{printf "%d\n", v*1000000}' || die "bad time $t" ;;
    *) die "bad time $t (use 20ms, 250us, 1s or 0)" ;;
  esac
}

# A tc rate (10mbit, 1gbit, 500kbit) -> bytes per second; none -> 0.
rate_bytes() {
  local r=$1
  [ "$r" = none ] && { echo 0; return; }
  [[ $r =~ ^([0-9]+)(bit|kbit|mbit|gbit)$ ]] || die "bad rate $r (use 100mbit, 1gbit or none)"
  local n=${BASH_REMATCH[1]} m
  case "${BASH_REMATCH[2]}" in bit) m=1 ;; kbit) m=1000 ;; mbit) m=1000000 ;; gbit) m=1000000000 ;; esac
  echo $((n * m / 8))
}

hosts() {
  echo origin
  for i in 1 2 3 4 5 6; do echo "cache$i"; done
  for ((i = 1; i <= workers; i++)); do echo "worker$i"; done
}

addr_of() {
  case "$1" in
    origin) echo "$net.1" ;;
    cache[1-6]) echo "$net.$((10 + ${1#cache}))" ;;
    worker*)
      local i=${1#worker}
      [[ $i =~ ^[0-9]+$ ]] && ((i >= 1 && i <= workers)) || die "no host $1 (workers: 1..$workers)"
      echo "$net.$((100 + i))" ;;
    router) echo "$net.254" ;;
    *) die "no host $1 (origin, cache1..cache6, worker1..worker$workers)" ;;
  esac
}

kind_of() {
  case "$1" in origin) echo origin ;; cache*) echo cache ;; *) echo worker ;; esac
}

load() {
  [ -f "$state/owner" ] && [ "$(cat "$state/owner")" = "$marker" ] || die "no network with prefix $prefix is up (no $state/owner)"
  # shellcheck disable=SC1091
  . "$state/config"
}

# The link table the delay daemon reads: IFNAME DELAY_US JITTER_US.
write_links() {
  local h k d j
  : >"$state/links.new"
  for h in $(hosts); do
    k=$(kind_of "$h")
    d=$(cat "$state/delay.$h" 2>/dev/null || eval echo "\$${k}_delay_us")
    eval j="\$${k}_jitter_us"
    echo "$h $d $j" >>"$state/links.new"
  done
  mv "$state/links.new" "$state/links"
  if [ -f "$state/delay.pid" ]; then kill -HUP "$(cat "$state/delay.pid")" 2>/dev/null || true; fi
}

# tbf at RATE on DEV in NS (both ends of a link get one, so each direction is limited).
shape() {
  local ns=$1 dev=$2 rate=$3 bytes burst
  bytes=$(rate_bytes "$rate")
  if [ "$bytes" = 0 ]; then
    ip netns exec "$ns" tc qdisc del dev "$dev" root 2>/dev/null || true
    return
  fi
  # 10 ms of the rate, but never less than one 64 KiB GSO packet.
  burst=$((bytes / 100))
  ((burst >= 65536)) || burst=65536
  ip netns exec "$ns" tc qdisc replace dev "$dev" root tbf rate "$rate" burst "$burst" latency 200ms
}

shape_link() {
  local h=$1 rate=$2
  shape "$prefix-$h" eth0 "$rate"
  shape "$router" "$h" "$rate"
}

up() {
  workers=3
  origin_delay=20ms origin_jitter=5ms origin_rate=1gbit
  cache_delay=200us cache_jitter=0 cache_rate=10gbit
  worker_delay=0 worker_rate=none
  while [ $# -gt 0 ]; do
    case "$1" in
      --workers) workers=$2 ;;
      --origin-delay) origin_delay=$2 ;;
      --origin-jitter) origin_jitter=$2 ;;
      --origin-rate) origin_rate=$2 ;;
      --cache-delay) cache_delay=$2 ;;
      --cache-jitter) cache_jitter=$2 ;;
      --cache-rate) cache_rate=$2 ;;
      --worker-delay) worker_delay=$2 ;;
      --worker-rate) worker_rate=$2 ;;
      *) die "up: unknown flag $1" ;;
    esac
    shift 2 || die "up: $1 needs a value"
  done
  [[ $workers =~ ^[0-9]+$ ]] && ((workers >= 1 && workers <= 100)) || die "--workers: 1 to 100"
  for t in "$origin_delay" "$origin_jitter" "$cache_delay" "$cache_jitter" "$worker_delay"; do usecs "$t" >/dev/null; done
  for r in "$origin_rate" "$cache_rate" "$worker_rate"; do rate_bytes "$r" >/dev/null; done
  command -v ip >/dev/null && command -v tc >/dev/null && command -v iptables >/dev/null ||
    die "needs ip, tc (iproute2) and iptables"
  command -v python3 >/dev/null || die "needs python3 (the delay daemon)"

  if [ -f "$state/owner" ]; then
    [ -f "$state/complete" ] && { echo "testnet.sh: $prefix is already up"; exit 0; }
    die "$prefix was half made: run 'testnet.sh --prefix $prefix down' first"
  fi
  local h
  for h in router $(hosts); do
    [ -e "/run/netns/$prefix-$h" ] && die "namespace $prefix-$h exists and was not made by testnet.sh here: refusing to touch it"
  done
  mkdir -p "$state"
  echo "$marker" >"$state/owner"
  : >"$state/namespaces"
  cat >"$state/config" <<EOF
workers=$workers
origin_rate=$origin_rate
cache_rate=$cache_rate
worker_rate=$worker_rate
origin_delay_us=$(usecs "$origin_delay")
origin_jitter_us=$(usecs "$origin_jitter")
cache_delay_us=$(usecs "$cache_delay")
cache_jitter_us=$(usecs "$cache_jitter")
worker_delay_us=$(usecs "$worker_delay")
worker_jitter_us=0
EOF
  # shellcheck disable=SC1091
  . "$state/config"

  local ra
  ra=$(addr_of router)
  echo "$router" >>"$state/namespaces"
  ip netns add "$router"
  ip -n "$router" link set lo up
  ip netns exec "$router" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "$router" sysctl -qw net.ipv4.conf.all.send_redirects=0
  # Faults: one chain per link, entered by packets coming in on it and going out on it.
  ip netns exec "$router" iptables -N FAULTS
  ip netns exec "$router" iptables -A FORWARD -j FAULTS
  for h in $(hosts); do
    local ns=$prefix-$h a
    a=$(addr_of "$h")
    echo "$ns" >>"$state/namespaces"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add eth0 netns "$ns" type veth peer name "$h" netns "$router"
    ip -n "$ns" addr add "$a/32" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add "$ra/32" dev eth0 scope link
    ip -n "$ns" route add "$subnet" via "$ra" dev eth0
    ip -n "$router" addr add "$ra/32" dev "$h"
    ip -n "$router" link set "$h" up
    ip -n "$router" route add "$a/32" dev "$h"
    ip netns exec "$router" iptables -N "F-$h"
    ip netns exec "$router" iptables -A FAULTS -i "$h" -j "F-$h"
    ip netns exec "$router" iptables -A FAULTS -o "$h" -j "F-$h"
    local k
    k=$(kind_of "$h")
    eval shape_link "$h" "\$${k}_rate"
  done
  write_links
  # The kernel here may lack netem, so delay is a user-space NFQUEUE daemon in the
  # router: every forwarded packet waits there for its two links' delays. It enters the
  # router's network namespace only: `ip netns exec` would also give it a mount
  # namespace of its own, holding copies of whatever FUSE mounts (lode agents') exist
  # now, for as long as it runs, and an agent cannot end while its mount lives on there.
  setsid nsenter --net="/run/netns/$router" python3 "$here/testnet-delay.py" "$state/links" 0 \
    </dev/null >"$state/delay.log" 2>&1 &
  echo $! >"$state/delay.pid"
  local tries=0
  until grep -q "^testnet-delay: queue" "$state/delay.log" 2>/dev/null; do
    kill -0 "$(cat "$state/delay.pid")" 2>/dev/null || die "the delay daemon died: $(cat "$state/delay.log")"
    ((++tries < 100)) || die "the delay daemon did not start: $(cat "$state/delay.log")"
    sleep 0.05
  done
  ip netns exec "$router" iptables -A FORWARD -j NFQUEUE --queue-num 0
  touch "$state/complete"
  echo "testnet.sh: $prefix up: origin $(addr_of origin), caches $net.11-16, workers $net.101-$((100 + workers))"
}

down() {
  if [ ! -d "$state" ]; then
    echo "testnet.sh: $prefix is not up"
    return 0
  fi
  [ -f "$state/owner" ] && [ "$(cat "$state/owner")" = "$marker" ] ||
    die "$state has no owner marker for $prefix: refusing to touch it"
  local pid ns
  if [ -f "$state/delay.pid" ]; then
    pid=$(cat "$state/delay.pid")
    # Only the daemon this network started (a recycled pid is someone else's).
    if grep -qa testnet-delay "/proc/$pid/cmdline" 2>/dev/null; then kill "$pid" 2>/dev/null || true; fi
  fi
  if [ -f "$state/namespaces" ]; then
    while read -r ns; do
      [[ $ns == "$prefix-"* ]] || continue
      [ -e "/run/netns/$ns" ] || continue
      # What still runs in our namespaces was started there by our users.
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    done <"$state/namespaces"
  fi
  rm -rf "$state"
  echo "testnet.sh: $prefix down"
}

fault() {
  load
  local what=${1:-}
  shift || true
  case "$what" in
    partition)
      local h=${1:?fault partition HOST}
      addr_of "$h" >/dev/null
      ip netns exec "$router" iptables -A "F-$h" -j DROP ;;
    slow)
      local h=${1:?fault slow HOST TIME} t=${2:?fault slow HOST TIME}
      addr_of "$h" >/dev/null
      usecs "$t" >"$state/delay.$h"
      write_links ;;
    loss)
      local h=${1:?fault loss HOST|all PCT} p=${2:?fault loss HOST|all PCT} hs
      [[ $p =~ ^([0-9]+(\.[0-9]+)?)%$ ]] || die "loss: give a percentage such as 1%"
      local prob
      prob=$(awk -v v="${BASH_REMATCH[1]}" 'BEGIN{printf "%.6f\n", v/100}')
      if [ "$h" = all ]; then hs=$(hosts); else addr_of "$h" >/dev/null; hs=$h; fi
      for h in $hs; do
        ip netns exec "$router" iptables -A "F-$h" -m statistic --mode random --probability "$prob" -j DROP
      done ;;
    throttle-origin)
      local r=${1:?fault throttle-origin RATE}
      rate_bytes "$r" >/dev/null
      shape_link origin "$r" ;;
    clear)
      local hs=${1:-$(hosts)}
      [ -n "${1:-}" ] && addr_of "$1" >/dev/null
      for h in $hs; do
        ip netns exec "$router" iptables -F "F-$h"
        rm -f "$state/delay.$h"
        local k
        k=$(kind_of "$h")
        eval shape_link "$h" "\$${k}_rate"
      done
      write_links ;;
    *) die "fault: partition HOST | slow HOST TIME | loss HOST|all PCT | throttle-origin RATE | clear [HOST]" ;;
  esac
}

status() {
  load
  echo "network $prefix ($subnet), state $state"
  if [ -f "$state/delay.pid" ] && kill -0 "$(cat "$state/delay.pid")" 2>/dev/null; then
    echo "delay daemon: running (pid $(cat "$state/delay.pid"))"
  else
    echo "delay daemon: NOT RUNNING ($(tail -n 3 "$state/delay.log" 2>/dev/null))"
  fi
  local h name d j faults qd
  while read -r name d j; do
    faults=$(ip netns exec "$router" iptables -S "F-$name" | grep -v '^-N' | sed 's/^-A F-[a-z0-9]* //' | paste -sd';' -) || true
    qd=$(ip netns exec "$router" tc qdisc show dev "$name" | awk '/tbf/{for(i=1;i<=NF;i++) if($i=="rate") print $(i+1)}') || true
    printf '%-9s %-16s %-15s delay %8sus jitter %7sus rate %-8s faults: %s\n' \
      "$name" "$prefix-$name" "$(addr_of "$name")" "$d" "$j" "${qd:-none}" "${faults:-none}"
  done <"$state/links"
}

case "$cmd" in
  up) up "$@" ;;
  down) down ;;
  status) status ;;
  fault) fault "$@" ;;
  hosts)
    load
    for h in $(hosts); do echo "$h $prefix-$h $(addr_of "$h")"; done ;;
  addr) load; addr_of "${1:?addr HOST}" ;;
  exec)
    load
    h=${1:?exec HOST CMD...}
    shift
    addr_of "$h" >/dev/null
    exec ip netns exec "$prefix-$h" "$@" ;;
  *) usage >&2; exit 2 ;;
esac

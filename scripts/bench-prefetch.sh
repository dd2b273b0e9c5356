#!/usr/bin/env bash
# A cold `lode run` against an S3 origin DELAY_MS away, on a fresh agent each time (empty
# memory and disk caches): demand only, with readahead, and with the image's recorded
# working set prefetched (and readahead). The store is moto's S3 server behind
# scripts/delay-proxy.py, which holds every request DELAY_MS; the image is flattened
# straight into moto, and its working set recorded by a first start through an agent.
#
# Usage (as root): [LODE=target/release/lode] [DELAY_MS=20] [RUNS=5] scripts/bench-prefetch.sh
#   LAYOUT  OCI layout (default /var/tmp/lode-family/family); IMAGE tag in it (default python)
#   CMD     what the start runs (default: python3 -c 'import json, sqlite3, email')
# Needs: moto_server (pip moto[server]), python3, crun or a chroot-capable kernel, fuse3.
# The connections column counts what the proxy accepted: moto's server answers every
# request with `Connection: close`, so there it is one per request; against a
# server that keeps them open lode reuses them (lode-read's tests/origin_s3.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
lode=$(realpath "${LODE:-target/release/lode}")
layout=${LAYOUT:-/var/tmp/lode-family/family}
image=${IMAGE:-python}
delay=${DELAY_MS:-20}
runs=${RUNS:-5}
work=$(mktemp -d /var/tmp/lode-bench-prefetch.XXXXXX)
pids=()
agent_pid=
cleanup() {
    [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for m in "$work"/agent-*/files; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

moto_port=$(free_port)
moto_server -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
pids+=($!)
proxy_port=$(free_port)
python3 "$repo/scripts/delay-proxy.py" "$proxy_port" "127.0.0.1:$moto_port" "$delay" >"$work/proxy.log" &
pids+=($!)
for _ in $(seq 100); do curl -s "http://127.0.0.1:$moto_port/" >/dev/null && break; sleep 0.1; done
curl -s -X PUT "http://127.0.0.1:$moto_port/bench" >/dev/null

export LODE_HOME=$work/home AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1
export LODE_STORE=s3://bench/lode
AWS_ENDPOINT_URL=http://127.0.0.1:$moto_port "$lode" -q flatten "oci:$layout:$image" --tag "$image" >/dev/null
export AWS_ENDPOINT_URL=http://127.0.0.1:$proxy_port
cmd=${CMD:-"python3 -c 'import json, sqlite3, email'"}

# One cold start on a fresh agent started with "$@"; prints seconds, origin fetches and
# the connections the agent opened to the origin (its HTTP client reuses them).
conns() { wc -l <"$work/proxy.log"; }
start() {
    local state
    state=$(mktemp -d "$work/agent-XXXXXX")
    "$lode" agent --state-dir "$state" "$@" >"$state.log" 2>&1 &
    agent_pid=$!
    for _ in $(seq 300); do "$lode" ls --control "$state/control.sock" >/dev/null 2>&1 && break; sleep 0.05; done
    local t0 t1 c0
    c0=$(conns)
    t0=$(date +%s.%N)
    if ! LODE_AGENT_CONTROL=$state/control.sock bash -c "\"$lode\" -q run \"$image\" -- $cmd" >"$state.run" 2>&1; then
        echo "lode run failed:" >&2; cat "$state.run" "$state.log" >&2
        kill "$agent_pid"; wait "$agent_pid" 2>/dev/null; umount -l "$state/files" 2>/dev/null
        exit 1
    fi
    t1=$(date +%s.%N)
    local fetched
    fetched=$("$lode" --json stats --control "$state/control.sock" |
        python3 -c 'import json,sys; v=json.load(sys.stdin); print(next(t["hits"] for t in v["tiers"] if t["name"]=="origin"))')
    kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true; agent_pid=
    echo "$(python3 -c "print(round($t1 - $t0, 3))") $fetched $(($(conns) - c0))"
}

echo "recording the working set of $image (origin $delay ms away)"
first=$(start --prefetch-record-window-ms 60000)
"$lode" --json inspect "$image" | python3 -c 'import json,sys; print("working set:", json.load(sys.stdin)["working_set"])'
echo "first start (recording, readahead on): $first (seconds, origin fetches, connections)"

report() {
    local label=$1; shift
    local times=() f= c=
    for _ in $(seq "$runs"); do
        read -r t f c < <(start "$@")
        times+=("$t")
    done
    python3 - "$label" "$f" "$c" "${times[@]}" <<'EOF'
import statistics, sys
label, fetched, conns = sys.argv[1:4]
ts = sorted(map(float, sys.argv[4:]))
print(f"| {label} | {statistics.median(ts)*1000:.0f} ms | {ts[0]*1000:.0f}-{ts[-1]*1000:.0f} ms | {fetched} | {conns} |")
EOF
}
echo
echo "| cold \`lode run $image -- $cmd\`, origin $delay ms away | median | range | origin fetches | connections |"
echo "|---|---|---|---|---|"
report "demand only" --no-prefetch --readahead-max-chunks 0
report "readahead" --no-prefetch
report "working set prefetched + readahead" 

#!/usr/bin/env bash
# The NBD "never read the replies" attack against a real `lode agent`, measured: CLIENTS
# connections each open the export and send READS reads of READ_KB KiB without reading a
# byte back, then sit on their sockets. Without a per-connection bound the agent would
# buffer every reply; with one, each connection holds at most [nbd] max_buffered_bytes
# (4 MiB by default) and the server stops reading its requests. Prints the agent's RSS
# before, while the clients hold on (peak of the samples, and VmHWM), and after they
# leave, with the server's own lode_nbd_* counters; a second round opens more
# connections than [nbd] max_connections and counts the refusals.
#
# Usage: [LODE=path/to/lode] [CLIENTS=32] [READS=256] [READ_KB=1024] [HOLD=5]
#        [CONFIG_EXTRA='max_buffered_bytes = "8MiB"'] scripts/nbd-attack.sh
#   LODE     lode binary (default: target/release/lode, built if absent)
#   HOLD     seconds to sample RSS once every client has sent its reads (default 5)
#   CONFIG_EXTRA  extra lines for the agent config's [nbd] section
# Needs python3. Runs unprivileged (no FUSE mount: the agent runs with --no-files).
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${CLIENTS:-32}
reads=${READS:-256}
read_kb=${READ_KB:-1024}
hold=${HOLD:-5}

die() { echo "nbd-attack: $*" >&2; exit 1; }
command -v python3 >/dev/null || die "python3 not found"
if [ -z "${LODE:-}" ]; then
  LODE=target/release/lode
  [ -x "$LODE" ] || cargo build --release -p lode >&2
fi
LODE=$(realpath "$LODE")

work=$(mktemp -d)
agent_pid=
cleanup() {
  [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
export LODE_HOME=$work/home
unset LODE_STORE LODE_KMS LODE_KMS_KEY LODE_AGENT_CONTROL LODE_AGENT_CONFIG

# An 8 MiB image: every client reads the same bytes, so the agent's caches hold the
# same few MiB in every run and what grows is what the NBD server buffers.
head -c $((8 << 20)) /dev/urandom > "$work/img.raw"
"$LODE" import "$work/img.raw" --tag attack >/dev/null
cat > "$work/agent.toml" <<EOF
[nbd]
${CONFIG_EXTRA:-}
EOF
"$LODE" agent --no-files --config "$work/agent.toml" > "$work/agent.out" 2> "$work/agent.err" &
agent_pid=$!
for _ in $(seq 300); do
  "$LODE" ls >/dev/null 2>&1 && break
  kill -0 "$agent_pid" 2>/dev/null || { cat "$work/agent.err" >&2; die "the agent exited"; }
  sleep 0.1
done
"$LODE" attach attack --name disk >/dev/null
sock=$LODE_HOME/agent/nbd.sock

rss() { awk '/^VmRSS/ {printf "%d\n", $2 * 1024}' "/proc/$agent_pid/status"; }
hwm() { awk '/^VmHWM/ {printf "%d\n", $2 * 1024}' "/proc/$agent_pid/status"; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
nbd_stat() {
  "$LODE" stats --json | python3 -c "import json,sys; print(json.load(sys.stdin).get('nbd', {}).get('$1', 'n/a'))"
}

# The hostile client: handshakes on every connection first, then sends every read, then
# holds the sockets open without reading until killed. Prints how many connections the
# server greeted and how many it closed before the greeting.
cat > "$work/attack.py" <<'EOF'
import os, socket, struct, sys, time

sock, name, clients, reads, read_len, warm = sys.argv[1], sys.argv[2].encode(), *map(int, sys.argv[3:7])
IHAVEOPT, REQ = 0x49484156454F5054, 0x25609513

def recv(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed")
        b += c
    return b

def connect():
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    recv(s, 18)  # greeting; EOF here means refused
    s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", IHAVEOPT, 7, 4 + len(name) + 2) + struct.pack(">I", len(name)) + name + b"\0\0")
    size = None
    while True:
        _, _, kind, n = struct.unpack(">QIII", recv(s, 20))
        data = recv(s, n)
        if kind == 1:
            return s, size
        if kind == 3 and data[:2] == b"\0\0":
            size = struct.unpack(">Q", data[2:10])[0]
        elif kind & 0x80000000:
            raise RuntimeError(data.decode(errors="replace"))

def requests(size, count):
    return b"".join(struct.pack(">IHHQQI", REQ, 0, 0, i, (i * read_len) % (size - read_len + 1), read_len) for i in range(count))

if warm:
    s, size = connect()
    s.sendall(requests(size, size // read_len))
    for _ in range(size // read_len):
        assert struct.unpack(">IIQ", recv(s, 16))[1] == 0
        recv(s, read_len)
    s.close()
    sys.exit(0)

conns, refused = [], 0
for _ in range(clients):
    try:
        conns.append(connect())
    except (EOFError, ConnectionResetError):
        refused += 1
for s, size in conns:
    s.setblocking(False)
    try:
        s.send(requests(size, reads))  # all of it fits in the socket buffer
    except BlockingIOError:
        pass
print(len(conns), refused, flush=True)
while True:
    time.sleep(3600)
EOF

read_len=$((read_kb << 10))
python3 "$work/attack.py" "$sock" disk 1 0 "$read_len" 1
sleep 1
before=$(rss)

round() {  # CLIENTS: attack, sample, report, stop
  local n=$1 out peak=0 r
  python3 "$work/attack.py" "$sock" disk "$n" "$reads" "$read_len" 0 > "$work/attack.out" &
  local attack=$!
  for _ in $(seq 600); do [ -s "$work/attack.out" ] && break; sleep 0.1; done
  for _ in $(seq $((hold * 5))); do
    r=$(rss); [ "$r" -gt "$peak" ] && peak=$r
    sleep 0.2
  done
  read -r greeted refused < "$work/attack.out"
  echo "  connections greeted $greeted, closed unread $refused"
  echo "  agent RSS while held: $(mib "$peak") (peak of samples), VmHWM $(mib "$(hwm)")"
  echo "  lode_nbd_buffered_bytes $(nbd_stat buffered_bytes), peak $(nbd_stat peak_buffered_bytes); connections open $(nbd_stat connections_open), refused $(nbd_stat connections_refused)"
  kill "$attack"; wait "$attack" 2>/dev/null || true
  sleep 1
  echo "  agent RSS after the clients left: $(mib "$(rss)")"
}

echo "lode $("$LODE" --version | awk '{print $2}') at $LODE; [nbd] ${CONFIG_EXTRA:-defaults}"
echo "agent RSS before (image read once, caches warm): $(mib "$before")"
echo "round 1: $clients clients x $reads reads of $read_kb KiB, never reading a reply ($(mib $((clients * reads * read_len))) asked for)"
round "$clients"
max=$(nbd_stat max_connections)
if [ "$max" != n/a ]; then
  echo "round 2: $((max + 16)) clients against max_connections = $max"
  round $((max + 16))
fi
grep -m1 "refused" "$work/agent.err" | sed 's/^/  agent log: /' || true

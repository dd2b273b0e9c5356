#!/usr/bin/env bash
# The worker agent's read path, measured side by side in one run:
#   1. warm 4 KiB random reads at QD1 and QD16 through NBD (fio's nbd engine), lode agent
#      against nbdkit's file plugin serving the same flat image (`lode export`) from the
#      page cache: IOPS, ratio, p50/p99 completion latency;
#   2. warm sequential 1 MiB reads at QD1 and QD4: GB/s for both;
#   3. 4 KiB reads served by the agent's disk tier with memory cold (agent stopped with
#      SIGTERM and started again on the same state dir): one read per stored chunk at QD1,
#      fio's clat and the disk tier's own histogram from `lode stats --json`; once with the
#      cache files still in the OS page cache and once after drop_caches;
#   4. cold start of a real program: `chroot MNT python3 -c 'import json, sqlite3, email'`
#      on the image mounted through a fresh agent (nbdfuse → loop → ext4), against the same
#      image file loop-mounted from local disk, page cache dropped before every run; time,
#      and the share of the image fetched from the store, at mount and after the run, at
#      the loop device's default readahead and at read_ahead_kb 0, 16 and 128 (and 0 on the
#      nbdfuse file too); and the same start once through `nbdkit --filter=log`, whose
#      logged offsets give the share a fetch granularity of 4 KiB … 1 MiB would cost.
# Prints the results as markdown at the end (scripts/bench-agent.py renders them), and
# writes them to $OUT if set. On a VM, QD1 latency depends heavily on how fast an idle vCPU
# wakes: compare the two sides within one run, not across runs or machines.
#
# Usage (as root): [OUT=results.md] [LODE=path/to/lode] scripts/bench-agent.sh   (about 5 min)
#   LODE     lode binary to use (default: cargo build --release, target/release/lode)
#   LAYOUT   OCI layout (default /var/tmp/lode-family/family; scripts/build-image-family.sh)
#   IMAGE    tag in LAYOUT to use (default python)
#   SECS     seconds per time-based fio run (default 10); RUNS repeats, median (default 3)
#   COLD_RUNS  cold-start runs per variant (default 5); RA  loop read_ahead_kb values to
#            try besides the default (default "0 16 128")
#   SECTIONS subset of "warm disk cold" to run (default all three); KEEP=1 keeps the work dir
# Needs: fio (nbd engine), nbdkit, nbdcopy + nbdfuse (libnbd-bin), fuse3, losetup, openssl,
# python3; the kernel's loop and ext4 and /dev/fuse.
set -euo pipefail
out=${OUT:+$(realpath -m "$OUT")}
[ -n "${LODE:-}" ] && LODE=$(realpath "$LODE")
cd "$(dirname "$0")/.."
repo=$PWD
started=$(date +%s.%N)

layout=${LAYOUT:-/var/tmp/lode-family/family}
image=${IMAGE:-python}
secs=${SECS:-10}
runs=${RUNS:-3}
cold_runs=${COLD_RUNS:-5}
ra_list=${RA-0 16 128}
sections=${SECTIONS:-warm disk cold}
rand_qds=(1 16)
seq_qds=(1 4)
chunk=$((512 << 10))
program=(python3 -c 'import json, sqlite3, email')

die() { echo "bench-agent: $*" >&2; exit 1; }
say() { echo "== $*" >&2; }
now() { date +%s.%N; }
want() { [[ " $sections " == *" $1 "* ]]; }

[ "$(id -u)" = 0 ] || die "run as root (loop devices, mounts, drop_caches)"
for t in fio nbdkit nbdcopy nbdfuse fusermount3 losetup mount chroot openssl python3; do
  command -v "$t" >/dev/null || die "$t not found (apt-get install -y fio nbdkit libnbd-bin fuse3 util-linux openssl)"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine"
[ -f "$layout/index.json" ] || die "no OCI layout at $layout: run scripts/build-image-family.sh ${layout%/family}"

if [ -z "${LODE:-}" ]; then
  say "building lode (release)"
  cargo build --release -q -p lode --locked
  LODE=${CARGO_TARGET_DIR:-$repo/target}/release/lode
fi
[ -x "$LODE" ] || die "no lode binary at $LODE"
helper=$repo/scripts/bench-agent.py

work=$(mktemp -d /var/tmp/lode-agent-bench.XXXXXX)
res=$work/res
mkdir -p "$res"
export LODE_HOME=$work/home
unset LODE_STORE LODE_KMS LODE_KMS_KEY LODE_AGENT_CONTROL LODE_AGENT_CONFIG

# ---------------------------------------------------------------- cleanup on any exit
# Mounts and loop devices are found from the system tables, not only from what the script
# recorded, so that a signal between `mount` and its bookkeeping leaves nothing behind.
loops=() pids=()
mounts_under() { # FSTYPE-REGEX: mount points under $work of that type, deepest first
  findmnt -rn -o TARGET,FSTYPE | awk -v w="$work/" -v t="$1" 'index($1, w) == 1 && $2 ~ t {print $1}' | sort -r
}
cleanup() {
  local rc=$? i
  set +e
  for i in $(mounts_under '^(ext4|ext2|ext3)$'); do umount "$i" || umount -l "$i"; done
  for i in /sys/block/loop*/loop/backing_file; do
    [[ -e $i && $(cat "$i") == "$work/"* ]] && loops+=("/dev/$(basename "$(dirname "$(dirname "$i")")")")
  done
  for i in "${loops[@]}"; do losetup "$i" >/dev/null 2>&1 && losetup -d "$i"; done
  for i in $(mounts_under '^fuse'); do fusermount3 -u "$i" 2>/dev/null || fusermount3 -uz "$i"; done
  for i in "${pids[@]}"; do kill -TERM "$i" 2>/dev/null; done
  for i in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$i" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$i" 2>/dev/null
  done
  if [ "${KEEP:-}" = 1 ]; then echo "kept $work" >&2; else rm -rf --one-file-system "$work"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget() { # forget VALUE from array NAME (it was released already)
  local -n arr=$1
  local out=() x
  for x in "${arr[@]}"; do [ "$x" = "$2" ] || out+=("$x"); done
  arr=("${out[@]}")
}

# ---------------------------------------------------------------- the agent
agent_flags=()
"$LODE" agent --help | grep -q -- '--no-files' && agent_flags+=(--no-files)
agent_pid=

start_agent() { # STATE_DIR [files]: starts the agent (with its FUSE files if asked),
  local d=$1 flags=("${agent_flags[@]}") # and waits for its control socket to answer
  [ "${2:-}" = files ] && flags=()
  mkdir -p "$d"
  "$LODE" agent --state-dir "$d" "${flags[@]}" >>"$d.log" 2>&1 &
  agent_pid=$!
  pids+=("$agent_pid")
  for _ in $(seq 300); do
    "$LODE" ls --control "$d/control.sock" >/dev/null 2>&1 && return 0
    kill -0 "$agent_pid" 2>/dev/null || { cat "$d.log" >&2; die "the agent exited"; }
    sleep 0.1
  done
  cat "$d.log" >&2
  die "the agent did not answer on $d/control.sock within 30 s"
}

stop_agent() { # SIGTERM, and wait for a clean exit (it settles its disk fills)
  kill -TERM "$agent_pid"
  wait "$agent_pid" || true
  forget pids "$agent_pid"
  agent_pid=
}

stats() { "$LODE" stats --json --control "$1/control.sock" >"$2"; }

wait_attached() { # STATE_DIR NAME: the restarted agent has re-attached NAME
  for _ in $(seq 100); do
    "$LODE" ls --json --control "$1/control.sock" | grep -q "\"$2\"" && return 0
    sleep 0.1
  done
  die "the agent did not re-attach $2"
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

fio_json() { # OUT ARGS...: one fio job, JSON to OUT
  local out=$1
  shift
  fio --name=bench --ioengine=nbd --output-format=json --output="$out" "$@" >/dev/null
}

# ---------------------------------------------------------------- the image
say "flattening $layout:$image"
"$LODE" -q flatten "oci:$layout:$image" --tag "$image" --work-dir "$work/tmp" >"$work/flatten.out"
flat=$work/$image.ext4
"$LODE" -q export "$image" "$flat"
size=$(stat -c %s "$flat")
nchunks=$(((size + chunk - 1) / chunk))
stored=$(python3 "$helper" iolog "$flat" "$chunk" "$work/disk.iolog")
python3 - "$res/meta.json" <<PY
import json, sys, platform, os
json.dump({
    "date": "$(date -u +%Y-%m-%dT%H:%MZ)",
    "host": f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, Linux {platform.release()}",
    "lode": "$("$LODE" --version | cut -d' ' -f2)",
    "image": "$image", "image_size": $size, "chunks": $nchunks, "stored_chunks": $stored,
    "agent_flags": "${agent_flags[*]}",
    "secs": $secs, "runs": $runs, "cold_runs": $cold_runs,
    "rand_qds": [int(x) for x in "${rand_qds[*]}".split()],
    "seq_qds": [int(x) for x in "${seq_qds[*]}".split()],
    "cold_variants": ["agent-file", "default"] + ["ra" + r for r in "$ra_list".split()] + ["ra0-fuse0"],
}, open(sys.argv[1], "w"))
PY
say "$image: $size bytes, $nchunks chunks, $stored stored"

# ---------------------------------------------------------------- 1 + 2: warm, lode vs nbdkit
A=$work/agent
if want warm || want disk; then
  start_agent "$A"
  "$LODE" -q attach "$image" --control "$A/control.sock" >/dev/null
fi
lode_uri="nbd+unix:///$image?socket=$A/nbd.sock"

if want warm; then
  say "warm: nbdkit file plugin on the exported image"
  nbdkit --unix "$work/nbdkit.sock" --pidfile "$work/nbdkit.pid" --readonly file "$flat"
  for _ in $(seq 100); do [ -s "$work/nbdkit.pid" ] && break; sleep 0.1; done
  pids+=("$(cat "$work/nbdkit.pid")")
  kit_uri="nbd+unix:///?socket=$work/nbdkit.sock"

  say "warm: reading both exports once"
  cat "$flat" >/dev/null
  nbdcopy "$kit_uri" null:
  nbdcopy "$lode_uri" null:
  nbdcopy "$lode_uri" null: # the second pass finds every chunk decrypted in memory
  mkdir -p "$res/warm"
  stats "$A" "$res/warm/stats-before.json"
  for i in $(seq "$runs"); do
    for qd in "${rand_qds[@]}"; do
      for side in lode nbdkit; do
        say "warm random 4k QD$qd $side ($i/$runs)"
        uri=$lode_uri
        [ $side = nbdkit ] && uri=$kit_uri
        fio_json "$res/warm/rand-qd$qd-$side-$i.json" --uri="$uri" --rw=randread --bs=4k \
          --iodepth="$qd" --norandommap --time_based --runtime="$secs"
      done
    done
    for qd in "${seq_qds[@]}"; do
      for side in lode nbdkit; do
        say "warm sequential 1M QD$qd $side ($i/$runs)"
        uri=$lode_uri
        [ $side = nbdkit ] && uri=$kit_uri
        fio_json "$res/warm/seq-qd$qd-$side-$i.json" --uri="$uri" --rw=read --bs=1M \
          --iodepth="$qd" --time_based --runtime="$secs"
      done
    done
  done
  stats "$A" "$res/warm/stats-after.json"
fi

# ---------------------------------------------------------------- 3: disk tier, memory cold
if want disk; then
  say "disk: filling the disk cache (whole export), then restarting the agent"
  nbdcopy "$lode_uri" null:
  python3 "$helper" ref "$res/ref.json"
  for case in pc-warm pc-cold; do
    stop_agent
    start_agent "$A" # same state dir: the disk tier re-indexes cache/, memory is empty
    wait_attached "$A" "$image"
    [ $case = pc-cold ] && drop_caches
    mkdir -p "$res/disk/$case"
    say "disk: one 4k read per stored chunk, QD1 (cache files: ${case#pc-} in page cache)"
    stats "$A" "$res/disk/$case/stats0.json"
    find "$A/cache" -maxdepth 1 -type f ! -name '.*' | wc -l >"$res/disk/$case/cache_files"
    fio_json "$res/disk/$case/fio.json" --uri="$lode_uri" --read_iolog="$work/disk.iolog" --iodepth=1
    stats "$A" "$res/disk/$case/stats1.json"
  done
fi
if [ -n "$agent_pid" ]; then stop_agent; fi

# ---------------------------------------------------------------- 4: cold start
run_times() { # MNT DEV OUTDIR [STATE_DIR]: mount, run the program, writing times (and stats)
  local mnt=$1 dev=$2 o=$3 d=${4:-} t0 t1 t2 r0
  local blkstat=/sys/block/${dev#/dev/}/stat # field 3: sectors read
  drop_caches
  [ -n "$d" ] && stats "$d" "$o/stats0.json"
  r0=$(awk '{print $3}' "$blkstat")
  t0=$(now)
  mount -o ro "$dev" "$mnt"
  t1=$(now)
  [ -n "$d" ] && stats "$d" "$o/stats1.json"
  env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin chroot "$mnt" "${program[@]}"
  t2=$(now)
  [ -n "$d" ] && stats "$d" "$o/stats2.json"
  echo "$t0 $t1 $t2" >"$o/times"
  awk -v r0="$r0" '{print ($3 - r0) * 512}' "$blkstat" >"$o/loop_read_bytes"
  umount "$mnt"
}

attach_loop() { # FILE: a read-only loop device on FILE, in $loop (not in a subshell, so
  loop=$(losetup --find --show --read-only "$1") # that the cleanup knows it)
  loops+=("$loop")
}

detach_loop() { losetup -d "$1"; forget loops "$1"; }

cold_local() { # OUTDIR
  local o=$1 dev
  mkdir -p "$o" "$work/mnt-local"
  attach_loop "$flat"
  dev=$loop
  cat "/sys/block/${dev#/dev/}/queue/read_ahead_kb" >"$o/ra"
  run_times "$work/mnt-local" "$dev" "$o"
  detach_loop "$dev"
}

cold_lode() { # OUTDIR RA ("" = the loop device's default) [FUSE_RA]
  local o=$1 ra=$2 fuse_ra=${3:-} d=$work/cold dev bdi
  rm -rf --one-file-system "$d"
  mkdir -p "$o" "$d/fuse" "$d/mnt"
  start_agent "$d/state"
  "$LODE" -q attach "$image" --control "$d/state/control.sock" >/dev/null
  nbdfuse -r -P "$d/nbdfuse.pid" "$d/fuse" "nbd+unix:///$image?socket=$d/state/nbd.sock" &
  fuse_pid=$!
  for _ in $(seq 100); do [ -s "$d/nbdfuse.pid" ] && break; sleep 0.1; done
  [ -e "$d/fuse/nbd" ] || die "nbdfuse did not come up on $d/fuse"
  bdi=/sys/class/bdi/$(mountpoint -d "$d/fuse")/read_ahead_kb
  [ -e "$res/cold/fuse_ra" ] || cat "$bdi" >"$res/cold/fuse_ra"
  [ -n "$fuse_ra" ] && echo "$fuse_ra" >"$bdi"
  attach_loop "$d/fuse/nbd"
  dev=$loop
  [ -n "$ra" ] && echo "$ra" >"/sys/block/${dev#/dev/}/queue/read_ahead_kb"
  cat "/sys/block/${dev#/dev/}/queue/read_ahead_kb" >"$o/ra"
  run_times "$d/mnt" "$dev" "$o" "$d/state"
  detach_loop "$dev"
  fusermount3 -u "$d/fuse"
  wait "$fuse_pid" || true # nbdfuse exits once unmounted
  stop_agent
  rm -rf --one-file-system "$d"
}

cold_lode_file() { # OUTDIR: what `lode mount` does — the agent's own FUSE file, no nbdfuse
  local o=$1 d=$work/cold dev
  rm -rf --one-file-system "$d"
  mkdir -p "$o" "$d/mnt"
  start_agent "$d/state" files
  "$LODE" -q attach "$image" --control "$d/state/control.sock" >/dev/null
  attach_loop "$d/state/files/$image"
  dev=$loop
  cat "/sys/block/${dev#/dev/}/queue/read_ahead_kb" >"$o/ra"
  run_times "$d/mnt" "$dev" "$o" "$d/state"
  detach_loop "$dev"
  stop_agent
  rm -rf --one-file-system "$d"
}

cold_trace() { # OUTDIR RA FUSE_RA ("" = default): the same start through nbdkit's log filter
  local o=$1 ra=$2 fuse_ra=$3 d=$work/trace dev kit_pid
  rm -rf --one-file-system "$d"
  mkdir -p "$o" "$d/fuse" "$d/mnt"
  nbdkit --unix "$d/sock" --pidfile "$d/pid" --readonly --filter=log file "$flat" logfile="$d/log"
  for _ in $(seq 100); do [ -s "$d/pid" ] && break; sleep 0.1; done
  kit_pid=$(cat "$d/pid")
  pids+=("$kit_pid")
  nbdfuse -r -P "$d/nbdfuse.pid" "$d/fuse" "nbd+unix:///?socket=$d/sock" &
  fuse_pid=$!
  for _ in $(seq 100); do [ -s "$d/nbdfuse.pid" ] && break; sleep 0.1; done
  [ -n "$fuse_ra" ] && echo "$fuse_ra" >"/sys/class/bdi/$(mountpoint -d "$d/fuse")/read_ahead_kb"
  cat "/sys/class/bdi/$(mountpoint -d "$d/fuse")/read_ahead_kb" >"$o/fuse_ra"
  attach_loop "$d/fuse/nbd"
  dev=$loop
  [ -n "$ra" ] && echo "$ra" >"/sys/block/${dev#/dev/}/queue/read_ahead_kb"
  cat "/sys/block/${dev#/dev/}/queue/read_ahead_kb" >"$o/ra"
  drop_caches
  wc -l <"$d/log" >"$o/log_start"
  run_times "$d/mnt" "$dev" "$o"
  detach_loop "$dev"
  fusermount3 -u "$d/fuse"
  wait "$fuse_pid" || true
  kill -TERM "$kit_pid"
  forget pids "$kit_pid"
  for _ in $(seq 50); do kill -0 "$kit_pid" 2>/dev/null || break; sleep 0.1; done
  cp "$d/log" "$o/nbd.log"
  rm -rf --one-file-system "$d"
}

if want cold; then
  mkdir -p "$res/cold"
  say "cold start, traced through nbdkit's log filter: default readahead, then none"
  cold_trace "$res/cold/trace-default" "" ""
  cold_trace "$res/cold/trace-ra0-fuse0" 0 0
  for i in $(seq "$cold_runs"); do
    say "cold start $i/$cold_runs: local disk"
    cold_local "$res/cold/local-$i"
    say "cold start $i/$cold_runs: lode, the agent's own FUSE file (as lode mount)"
    cold_lode_file "$res/cold/agent-file-$i"
    say "cold start $i/$cold_runs: lode through nbdfuse, default readahead"
    cold_lode "$res/cold/default-$i" ""
    for ra in $ra_list; do
      say "cold start $i/$cold_runs: lode, read_ahead_kb=$ra"
      cold_lode "$res/cold/ra$ra-$i" "$ra"
    done
    say "cold start $i/$cold_runs: lode, read_ahead_kb=0 on the loop device and the nbdfuse file"
    cold_lode "$res/cold/ra0-fuse0-$i" 0 0
  done
fi

# ---------------------------------------------------------------- report
python3 -c "print($(now) - $started)" >"$res/runtime"
python3 "$helper" report "$res" >"$work/report.md"
echo
cat "$work/report.md"
if [ -n "$out" ]; then cp "$work/report.md" "$out"; fi

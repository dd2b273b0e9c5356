#!/usr/bin/env bash
# Garbage collection measured on the image family, in one run:
#   1. copy-forward throughput against the naive re-encryption: `lode root rotate` +
#      `lode root copy-forward`, against `lode export` + `lode import -t` of every image
#      after a rotation; MiB/s of plaintext re-sealed, page cache dropped before each, a
#      fresh store each run, median and min … max of 3 runs;
#   2. bytes reclaimed: half the tags removed, dead bytes from `lode store stats`, then
#      `lode root rotate` and `lode gc --grace 0s`; stored bytes before − after must equal
#      the dead bytes and gc's reclaimed bytes the whole old root (the run fails if not);
#   3. what gc costs a reader: random 4 KiB reads (fio, NBD, queue depth 1) through
#      `lode agent` with its caches off, idle and while copy-forward runs on the same
#      store; p50/p99 latency and their ratios.
# Writes the results as JSON (gc.json) and a markdown summary (printed, and written to
# docs/evaluation/gc.md). The store is a local directory: one machine, local disk.
#
# Usage (as root):  scripts/bench-gc.sh [--quick] [--out FILE.md] [--parts LIST] [--keep]
#   --quick        one run per figure and 10 s read windows (about 70 s with lode and
#                  the family built); without it 3 runs and 20 s windows (about 2 minutes)
#   --out FILE     the markdown summary (default docs/evaluation/gc.md; the JSON goes
#                  beside it as gc.json)
#   --parts LIST   comma-separated subset of copy,reclaim,readers (default: all)
#   --keep         keep the scratch directory (stores, agent log, fio logs)
#   LAYOUT=DIR     the image family's OCI layout (default /var/tmp/lode-family/family;
#                  built with scripts/build-image-family.sh if missing, which needs
#                  Debian's package mirror)
#   LODE=PATH      a lode binary to use instead of `cargo build --release -p lode`
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
quick= out=docs/evaluation/gc.md parts=copy,reclaim,readers keep=
args=("$@")
while (($#)); do
  case $1 in
    --quick) quick=--quick ;;
    --out) out=${2:?--out needs a file}; shift ;;
    --parts) parts=${2:?--parts needs a list}; shift ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-gc: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
die() { echo "bench-gc: $*" >&2; exit 1; }
say() { echo "== $*" >&2; }
[ "$(id -u)" = 0 ] || die "run as root (drop_caches, and the family build's chroot)"

need=()
for t in fio:fio umoci:umoci; do
  command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
if ((${#need[@]})); then
  say "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine"

layout=${LAYOUT:-/var/tmp/lode-family/family}
if [ ! -f "$layout/index.json" ]; then
  [ -z "${LAYOUT:-}" ] || die "no OCI layout at $layout"
  say "building the image family (about 5 minutes, from Debian's mirror)"
  scripts/build-image-family.sh "${layout%/family}"
fi

if [ -z "${LODE:-}" ]; then
  say "building lode (release)"
  cargo build --release -q --locked -p lode
  LODE=${CARGO_TARGET_DIR:-$repo/target}/release/lode
fi
[ -x "$LODE" ] || die "no lode binary at $LODE"

work=$(mktemp -d /var/tmp/lode-gc-bench.XXXXXX)
agent_pid_of() { # the agent this run started, found by its state dir under $work
  pgrep -f -- "--state-dir $work/agent" || true
}
cleanup() {
  local pid
  for pid in $(agent_pid_of); do kill -TERM "$pid" 2>/dev/null || true; done
  if [ -n "$keep" ]; then echo "bench-gc: kept $work" >&2; else rm -rf --one-file-system "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

json_out=$(dirname "$out")/gc.json
if ! /usr/bin/python3 scripts/bench_gc.py $quick --parts "$parts" --lode "$LODE" --layout "$layout" \
  --work "$work" --json-out "$json_out" --md-out "$out" --command "$(echo scripts/bench-gc.sh "${args[@]}")"; then
  keep=1
  die "failed (above); the stores and logs are in $work"
fi
say "summary: $out; results: $json_out"

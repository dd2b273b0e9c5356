#!/usr/bin/env bash
# lode's evaluation in one command: every benchmark beside its peer, in one run, written
# up as docs/EVALUATION.md with plots in docs/evaluation/.
#
# Usage (as root):  scripts/bench.sh [--quick] [--sections LIST] [--out FILE] [--keep]
#   --quick          the quick subset: fewer runs, starts and seconds (about 6 minutes
#                    with lode and the benches already built, section 11 aside); without
#                    it the full set (about 16 minutes, and section 11 about 45 more)
#   --sections LIST  comma-separated subset of dedup,starts,replay,peers,snapshot,startcost,network,vm,scale
#                    (default: all; sections not run are listed as such in the report)
#   --out FILE       the report (default docs/EVALUATION.md; plots go to evaluation/
#                    beside it)
#   --keep           keep the scratch directory (stores, agent logs, raw results)
#   LAYOUT=DIR       the image family's OCI layout (default /var/tmp/lode-family/family;
#                    built with scripts/build-image-family.sh if missing, which needs
#                    Debian's package mirror)
#   LODE=PATH        a lode binary to use instead of building one
#
# What each figure measures, and how, is written into the report itself. Results of the
# run stay in $WORK/results/*.json; `scripts/evaluation.py RESULTS OUT` renders again.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
quick= sections=dedup,starts,replay,peers,snapshot,startcost,network,vm,scale out=docs/EVALUATION.md keep=
args=("$@")
while (($#)); do
  case $1 in
    --quick) quick=--quick ;;
    --full) quick= ;;
    --sections) sections=${2:?--sections needs a list}; shift ;;
    --out) out=${2:?--out needs a file}; shift ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
die() { echo "bench: $*" >&2; exit 1; }
say() { echo "== $*" >&2; }
[ "$(id -u)" = 0 ] || die "run as root (loop devices, mounts, drop_caches, chroot)"

# What the benchmarks need, installed if missing (the system python, for matplotlib).
need=()
/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || need+=(python3-matplotlib)
for t in umoci:umoci mkfs.ext4:e2fsprogs fio:fio nbdkit:nbdkit nbdfuse:libnbd-bin nbdcopy:libnbd-bin \
         fusermount3:fuse3 memcached:memcached crun:crun openssl:openssl debootstrap:debootstrap \
         busybox:busybox-static skopeo:skopeo docker-registry:docker-registry iptables:iptables ip:iproute2; do
  command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
if ((${#need[@]})); then
  say "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

layout=${LAYOUT:-/var/tmp/lode-family/family}
if [ ! -f "$layout/index.json" ]; then
  [ -z "${LAYOUT:-}" ] || die "no OCI layout at $layout"
  say "building the image family (about 5 minutes, from Debian's mirror)"
  scripts/build-image-family.sh "${layout%/family}"
fi

target=${CARGO_TARGET_DIR:-$repo/target}
if [ -z "${LODE:-}" ]; then
  say "building lode and the benches (release)"
  cargo build --release -q --locked -p lode
  LODE=$target/release/lode
fi
s3server=
if [[ ",$sections," == *,network,* ]]; then
  # The origin of the test network (scripts/testnet.sh): the S3-protocol server the tests use.
  cargo build --release -q --locked -p lode-testkit --features s3 --bin lode-s3-server
  s3server=$target/release/lode-s3-server
fi
if [[ ",$sections," == *,peers,* || ",$sections," == *,snapshot,* ]]; then
  cargo bench --no-run -q --locked -p lode-nbd -p lode-cache-node -p lode-snap -p lode-format -p lode-az
fi
if [[ ",$sections," == *,scale,* ]]; then
  # Section 11 runs lode-snap's burst bench and lode-az's hedging measurement.
  cargo bench --no-run -q --locked -p lode-snap --bench burst
  cargo test --release --no-run -q --locked -p lode-az --test hedge
fi

work=$(mktemp -d /var/tmp/lode-eval.XXXXXX)
cleanup() {
  # Anything a section left mounted under the work dir (it unmounts its own on errors).
  for m in $(awk -v w="$work" '$2 ~ "^"w {print $2}' /proc/mounts | sort -r); do umount -l "$m" || true; done
  if [ -n "$keep" ]; then echo "bench: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
if ! /usr/bin/python3 scripts/bench.py $quick --sections "$sections" --lode "$LODE" --layout "$layout" \
  ${s3server:+--s3-server "$s3server"} \
  --work "$work/work" --results "$work/results" --command "$(echo scripts/bench.sh "${args[@]}")"; then
  keep=1  # the agents' and nodes' logs the error points to
  die "a section failed (above); its logs are in $work/work"
fi
/usr/bin/python3 scripts/evaluation.py "$work/results" "$out"
mkdir -p "$(dirname "$out")/evaluation"
cp "$work"/results/*.json "$(dirname "$out")/evaluation/"
say "report: $out"

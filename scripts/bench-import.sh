#!/usr/bin/env bash
# Import throughput: `lode import` of a raw image of SIZE_MIB (default 2048) of which the
# second half repeats the first, chunk for chunk, into a fresh local-directory store.
# Prints MB/s, stored bytes and the dedup figures; beside them, the rate of copying the
# same file into the same filesystem (`cp`), the floor any importer that stores its input
# pays. Usage: scripts/bench-import.sh [SIZE_MIB] [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-2048}
work=${2:-$(mktemp -d /var/tmp/lode-bench.XXXXXX)}
half=$((size_mib / 2))
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

cargo build --release -q -p lode
lode=target/release/lode

echo "== generating $size_mib MiB: $half MiB random, then the same $half MiB again"
head -c "$((half * 1024 * 1024))" /dev/urandom >"$work/half"
cat "$work/half" "$work/half" >"$work/image.raw"
rm "$work/half"
sync

export LODE_HOME="$work/home"
echo "== lode import (timed with the final sync, like cp below)"
start=$(date +%s.%N)
"$lode" --json import "$work/image.raw" --tag bench >"$work/import.json"
sync
end=$(date +%s.%N)
python3 - "$work/import.json" "$size_mib" "$start" "$end" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); s = r["stats"]; mib = int(sys.argv[2])
secs = float(sys.argv[4]) - float(sys.argv[3])
print(f"lode import: {s['device_size']/secs/1e6:.0f} MB/s "
      f"({secs:.2f} s for {mib} MiB incl. sync; {r['seconds']:.2f} s before sync)")
print(f"  chunks {s['chunks']}, uploaded {s['uploaded_chunks']} "
      f"({s['uploaded_bytes']} bytes stored), repeated within image {s['repeated_chunks']}, "
      f"dedup share {r['dedup_share']*100:.1f}%")
PY
du -sb "$LODE_HOME/store" | awk '{print "  store on disk: " $1 " bytes"}'

echo "== yardstick: cp of the same file into the same filesystem"
start=$(date +%s.%N)
cp "$work/image.raw" "$work/copy.raw"
sync
end=$(date +%s.%N)
python3 -c "import sys; s=float(sys.argv[2])-float(sys.argv[1]); print(f'cp: {$size_mib*1048576/s/1e6:.0f} MB/s ({s:.2f} s)')" "$start" "$end"

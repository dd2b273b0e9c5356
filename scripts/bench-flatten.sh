#!/usr/bin/env bash
# Flatten throughput and dedup over the image family, lode against the naive pipeline,
# side by side in one run:
#   lode:  lode flatten oci:LAYOUT:TAG                       (into store A)
#   naive: umoci raw unpack (extract the merged tree) → mkfs.ext4 -d → lode import
#                                                           (into store B, same chunking)
# Images are flattened in the order given, so each later image dedups against the
# earlier ones. mkfs.ext4 gets a fixed UUID, hash seed and clock, its best case for
# dedup. Also reports the share of the base layer's region chunks that each app image
# found already stored (lode's goal: at least 95%).
#
# Usage: scripts/bench-flatten.sh [LAYOUT] [TAGS...]
#   LAYOUT defaults to /var/tmp/lode-family/family (scripts/build-image-family.sh builds
#   it); TAGS default to: base python pyweb node gcc.
set -euo pipefail
cd "$(dirname "$0")/.."
layout=${1:-/var/tmp/lode-family/family}
shift || true
tags=("$@")
((${#tags[@]})) || tags=(base python pyweb node gcc)
[ -f "$layout/index.json" ] || { echo "no OCI layout at $layout: run scripts/build-image-family.sh first" >&2; exit 1; }
work=$(mktemp -d /var/tmp/lode-flatten-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
cargo build --release -q -p lode
lode=$PWD/target/release/lode
A="--store $work/store-lode --kms $work/keyring.json"
B="--store $work/store-naive --kms $work/keyring.json"
now() { date +%s.%N; }
export E2FSPROGS_FAKE_TIME=1700000000
fixed=00000000-0000-0000-0000-00000000a0de

for t in "${tags[@]}"; do
  echo "== $t" >&2
  sync; s=$(now)
  $lode $A --json -q flatten "oci:$layout:$t" --tag "f/$t" --work-dir "$work/tmp" >"$work/lode-$t.json"
  sync; e=$(now)
  echo "$s $e" >"$work/lode-$t.time"
  $lode $A inspect "f/$t" >"$work/lode-$t.manifest.json"

  sync; s=$(now)
  umoci raw unpack --image "$layout:$t" "$work/rootfs-$t" >/dev/null
  kib=$(du -sk "$work/rootfs-$t" | cut -f1)
  size_kib=$((kib * 13 / 10 + 32768))
  mkfs.ext4 -q -F -U "$fixed" -E "hash_seed=$fixed,root_owner=0:0" -d "$work/rootfs-$t" \
    "$work/naive-$t.ext4" "${size_kib}k"
  $lode $B --json -q import "$work/naive-$t.ext4" --tag "n/$t" >"$work/naive-$t.json"
  sync; e=$(now)
  echo "$s $e" >"$work/naive-$t.time"
  rm -rf "$work/rootfs-$t" "$work/naive-$t.ext4"
done

python3 - "$work" "${tags[@]}" <<'PY'
import json, sys
work, tags = sys.argv[1], sys.argv[2:]
def load(p): return json.load(open(f"{work}/{p}"))
def secs(p):
    s, e = open(f"{work}/{p}").read().split(); return float(e) - float(s)
print("| image | layers | lode image | lode time | lode MB/s | lode uploaded | lode dedup | naive image | naive time | naive MB/s | naive uploaded | naive dedup | time ratio naive/lode |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
tot = dict(lt=0, nt=0, lu=0, nu=0, lb=0, nb=0)
for t in tags:
    l, n = load(f"lode-{t}.json"), load(f"naive-{t}.json")
    lt, nt = secs(f"lode-{t}.time"), secs(f"naive-{t}.time")
    ls, ns = l["stats"], n["stats"]
    tot["lt"] += lt; tot["nt"] += nt; tot["lu"] += ls["uploaded_bytes"]; tot["nu"] += ns["uploaded_bytes"]
    tot["lb"] += l["image_size"]; tot["nb"] += ns["device_size"]
    print(f"| {t} | {len(l['layers'])} | {l['image_size']/2**20:.1f} MiB | {lt:.2f} s | {l['image_size']/lt/1e6:.0f} | "
          f"{ls['uploaded_bytes']/2**20:.1f} MiB | {l['dedup_share']*100:.1f}% | {ns['device_size']/2**20:.1f} MiB | "
          f"{nt:.2f} s | {ns['device_size']/nt/1e6:.0f} | {ns['uploaded_bytes']/2**20:.1f} MiB | {n['dedup_share']*100:.1f}% | {nt/lt:.2f} |")
print(f"| **all** | | {tot['lb']/2**20:.0f} MiB | {tot['lt']:.2f} s | | {tot['lu']/2**20:.1f} MiB stored | | "
      f"{tot['nb']/2**20:.0f} MiB | {tot['nt']:.2f} s | | {tot['nu']/2**20:.1f} MiB stored | | {tot['nt']/tot['lt']:.2f} |")
base = tags[0]
bm = load(f"lode-{base}.manifest.json"); bl = load(f"lode-{base}.json")
cs = bm["chunk_size"]; base_names = set(c for c in bm["chunks"] if c)
print()
print(f"Base layer ({base}) region reuse in each later image (chunks of layer 0's region already stored):")
for t in tags[1:]:
    m = load(f"lode-{t}.manifest.json"); l = load(f"lode-{t}.json")
    r = l["layers"][0]; lo, hi = r["region_start"] // cs, -(-r["region_end"] // cs)
    region = [c for c in m["chunks"][lo:hi] if c]
    hit = sum(1 for c in region if c in base_names)
    print(f"  {t}: {hit}/{len(region)} chunks = {100*hit/max(1,len(region)):.1f}% of the base layer's bytes deduplicated")
PY

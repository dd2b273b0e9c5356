#!/usr/bin/env bash
# Would compressing each v2 segment before sealing pay? Stored bytes and decompression
# cost of lz4 and zstd on the image family, beside no codec and the family's gzip layers.
#
#   1. flattens every image of the family with lode (one store, so chunks dedupe across
#      images as they do in production) and exports each as its raw ext4 image;
#   2. sums the family's distinct gzip layer blobs (what the registry stores);
#   3. runs `cargo bench -p lode-format --bench compress` on the raw images, which writes
#      docs/evaluation/compress.json.
#
# Usage: scripts/bench-compress.sh [LAYOUT] [TAGS...]
#   LAYOUT defaults to /var/tmp/lode-family/family (scripts/build-image-family.sh builds
#   it); TAGS default to base python pyweb node gcc.
#   LODE_COMPRESS_WORK=DIR keeps the flattened and exported images in DIR and reuses them
#   on the next run; COMPRESS_ARGS passes more arguments to the bench (e.g.
#   "--segment 16384 --json /tmp/c16.json": a later --json wins).
set -euo pipefail
cd "$(dirname "$0")/.."
layout=${1:-/var/tmp/lode-family/family}
shift || true
tags=("$@")
((${#tags[@]})) || tags=(base python pyweb node gcc)
[ -f "$layout/index.json" ] || { echo "bench-compress: no OCI layout at $layout (run scripts/build-image-family.sh /var/tmp/lode-family)" >&2; exit 1; }

if [ -n "${LODE_COMPRESS_WORK:-}" ]; then
  work=$LODE_COMPRESS_WORK
  mkdir -p "$work"
else
  work=$(mktemp -d /var/tmp/lode-compress-bench.XXXXXX)
  trap 'rm -rf "$work"' EXIT
fi
cargo build --release -q -p lode
lode=$PWD/target/release/lode
A=(--store "$work/store" --kms "$work/keyring.json")
images=()
for t in "${tags[@]}"; do
  if [ ! -f "$work/$t.img" ]; then
    echo "== flatten and export $t" >&2
    "$lode" "${A[@]}" -q flatten "oci:$layout:$t" --tag "f/$t" --work-dir "$work/tmp" >/dev/null
    "$lode" "${A[@]}" -q export "f/$t" "$work/$t.img.part" >/dev/null
    mv "$work/$t.img.part" "$work/$t.img"
  fi
  images+=("$work/$t.img")
done

gzip_bytes=$(python3 - "$layout" "${tags[@]}" <<'PY'
import json, os, sys
layout, tags = sys.argv[1], sys.argv[2:]
blob = lambda d: os.path.join(layout, "blobs", *d.split(":", 1))
index = json.load(open(os.path.join(layout, "index.json")))
layers = {}
for m in index["manifests"]:
    if m.get("annotations", {}).get("org.opencontainers.image.ref.name") in tags:
        for l in json.load(open(blob(m["digest"])))["layers"]:
            layers[l["digest"]] = l["size"]
print(sum(layers.values()))
PY
)
echo "== the family's distinct layer blobs: $gzip_bytes bytes" >&2
cargo bench -q -p lode-format --bench compress -- "${images[@]}" --gzip-bytes "$gzip_bytes" \
  --json "$PWD/docs/evaluation/compress.json" ${COMPRESS_ARGS:-}

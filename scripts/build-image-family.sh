#!/usr/bin/env bash
# Builds lode's realistic image family, offline from a Docker engine: a Debian bookworm
# minbase root as the base layer, and images that add different application layers on
# top of that same base layer, all in one OCI image layout.
#
#   base      debootstrap --variant=minbase
#   python    base + python3
#   pyweb     base + python3 python3-flask         (shares python's packages, differently)
#   node      base + nodejs
#   gcc       base + gcc libc6-dev
#
# Usage: scripts/build-image-family.sh OUT_DIR [--small]
#   OUT_DIR/family is the OCI layout (tags: base python pyweb node gcc; --small: base
#   python). Needs root, debootstrap, umoci and Debian's package mirror. Safe to re-run:
#   a finished layout is left alone.
set -euo pipefail
out=${1:?usage: scripts/build-image-family.sh OUT_DIR [--small]}
small=${2:-}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
layout="$out/family"

if [ "$(id -u)" != 0 ]; then echo "build-image-family: needs root (debootstrap, chroot)" >&2; exit 1; fi
for tool in debootstrap umoci; do
  command -v "$tool" >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool"; }
done

apps=(python pyweb node gcc)
[ "$small" = --small ] && apps=(python)
declare -A pkgs=([python]="python3" [pyweb]="python3 python3-flask" [node]="nodejs" [gcc]="gcc libc6-dev")
declare -A cmds=([python]="python3" [pyweb]="python3" [node]="node" [gcc]="gcc")

have_tag() { [ -f "$layout/index.json" ] && umoci ls --layout "$layout" 2>/dev/null | grep -qx "$1"; }

mkdir -p "$out"
work=$(mktemp -d "$out/.work.XXXXXX")
cleanup() {
  for m in $(mount | awk -v w="$work" '$3 ~ "^"w {print $3}' | sort -r); do umount -l "$m" || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Pinned names so two builds of the family agree on everything but package updates.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}

if ! have_tag base; then
  echo "== base: debootstrap --variant=minbase $suite"
  debootstrap --variant=minbase "$suite" "$work/base-root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$work/base-root/var/cache/apt/archives/"*.deb "$work/base-root/var/lib/apt/lists/"*
  [ -d "$layout" ] || umoci init --layout "$layout"
  umoci new --image "$layout:base"
  umoci unpack --image "$layout:base" "$work/base-bundle" >/dev/null
  cp -a "$work/base-root/." "$work/base-bundle/rootfs/"
  umoci repack --image "$layout:base" "$work/base-bundle"
  umoci config --image "$layout:base" --config.cmd /bin/bash \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  rm -rf "$work/base-bundle" "$work/base-root"
fi

for app in "${apps[@]}"; do
  have_tag "$app" && { echo "== $app: already built"; continue; }
  echo "== $app: base + ${pkgs[$app]}"
  umoci unpack --image "$layout:base" "$work/$app" >/dev/null
  root="$work/$app/rootfs"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  mount -t proc proc "$root/proc"
  mount --bind /dev "$root/dev"
  chroot "$root" apt-get update -qq
  chroot "$root" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends ${pkgs[$app]} >"$work/$app.log" 2>&1 ||
    { tail -20 "$work/$app.log" >&2; exit 1; }
  chroot "$root" apt-get clean
  umount "$root/dev" "$root/proc"
  rm -rf "$root/var/lib/apt/lists/"* "$root/etc/resolv.conf"
  : >"$root/etc/resolv.conf"
  umoci tag --image "$layout:base" "$app"
  umoci repack --image "$layout:$app" "$work/$app"
  umoci config --image "$layout:$app" --config.cmd "${cmds[$app]}"
  rm -rf "${work:?}/$app"
done
umoci gc --layout "$layout"
echo "== done: $layout"
umoci ls --layout "$layout"
du -sh "$layout"

#!/usr/bin/env bash
# lode's whole test suite, as CI runs it: installs the Debian packages the tests use when
# they are missing, then checks formatting, lints, and runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tools the system tests drive: mkfs.ext4/e2fsck/debugfs (e2fsprogs), umoci and skopeo
# (OCI reference unpacking), python3 for the test-vector generator, and the NBD clients
# no one here wrote (nbdinfo, nbdcopy, nbdsh, qemu-img, fio's nbd engine, nbdkit), and a
# real registry with htpasswd/token auth (docker-registry, apache2-utils, openssl), and
# fusermount3 for FUSE mounts when not root (fuse3), and what `lode run` is tested with:
# crun and a busybox-static root; memcached and libmemcached-tools (memccp, memccat,
# memccapable) for the AZ cache node's conformance suite and the AZ client's fleet tests;
# python3-matplotlib for the evaluation report's renderer (scripts/test_evaluation.py);
# python3-cryptography and python3-lz4 for the test-vector generator, which checks the
# chunk format's vectors (lz4-compressed chunks among them) apart from the Rust;
# iproute2 (ip, tc) and iptables for the test network of scripts/testnet.sh, on which
# crates/lode/tests/network.rs injects faults (its link delays come from NFQUEUE and
# python3, not netem, so no kernel module needs loading: docs/network.md).
# qemu-system-x86 and linux-image-cloud-amd64 for `lode vm run`'s tests, which boot a
# QEMU machine on Debian's cloud kernel (busybox-static makes its initramfs).
packages=(e2fsprogs umoci skopeo python3 nbdkit libnbd-bin python3-libnbd fio qemu-utils
  docker-registry apache2-utils openssl fuse3 crun busybox-static memcached libmemcached-tools
  python3-matplotlib python3-cryptography python3-lz4 iproute2 iptables qemu-system-x86
  linux-image-cloud-amd64)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "== missing packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})"
  fi
fi
# moto's server (PyPI `moto[server]`): the real S3, KMS and IAM protocol server that the
# AWS KMS backend, the store role policies and the control service are tested against.
if ! command -v moto_server >/dev/null 2>&1; then
  echo "== installing moto[server]"
  python3 -m pip install --quiet 'moto[server]>=5.2,<5.3'
fi
# As root (or under CI) every tool above is installed and the tests run as root, so a
# test that would skip for want of a tool or of root fails instead (lode-testkit).
if [ "$(id -u)" = 0 ] || [ "${CI:-}" = true ]; then
  export LODE_REQUIRE_TOOLS=1
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked --no-fail-fast
echo "== evaluation scripts"
cargo build --locked -q -p lode
LODE=${CARGO_TARGET_DIR:-target}/debug/lode /usr/bin/python3 scripts/test_evaluation.py

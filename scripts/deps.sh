#!/usr/bin/env bash
# Installs what vaultfs needs to build, run and test on Debian 12 (run as root).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PKGS=(fuse3 pkg-config libssl-dev build-essential attr e2fsprogs util-linux libtss2-dev swtpm swtpm-tools tpm2-tools python3 gocryptfs bindfs)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install a Rust toolchain (rustup) first" >&2
  exit 1
fi
# The fsx file-system exerciser (crates.io), used by the test suite.
if [ "${1:-}" = "--test" ] && ! command -v fsx >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/fsx" ]; then
  cargo install --quiet --locked fsx
fi
# FUSE over io_uring (Linux 6.14+; off by default): vaultfs then serves each request on the CPU
# that made it (docs/PERFORMANCE.md). Other FUSE file systems are unaffected: the kernel only
# offers it, and a server that does not ask keeps /dev/fuse.
modprobe fuse 2>/dev/null || true
URING=/sys/module/fuse/parameters/enable_uring
if [ -w "$URING" ] && [ "$(cat "$URING")" != Y ]; then
  echo Y >"$URING"
fi

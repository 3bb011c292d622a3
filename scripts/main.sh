#!/usr/bin/env bash
# The main job on embedded defaults: installs what is needed, builds vaultfs, creates a vault with
# a random raw key and mounts it at /persist/vault/demo, then writes and reads a file through it
# and shows what lies on disk. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release --workspace --bins
BIN=$PWD/target/release
STATE=/var/lib/vaultfs/demo
MNT=/persist/vault/demo
mkdir -p "$STATE" "$MNT"
chmod 700 /var/lib/vaultfs
if mountpoint -q "$MNT"; then fusermount3 -u "$MNT"; fi
if [ ! -f "$STATE/cipher/vaultfs.conf" ]; then
  mkdir -p "$STATE/cipher"
  ( umask 077; head -c 32 /dev/urandom > "$STATE/key" )
  "$BIN/vaultctl" init --name demo --key-file "$STATE/key" "$STATE/cipher"
fi
"$BIN/vaultfs" --key-file "$STATE/key" --log-file "$STATE/vaultfs.log" "$STATE/cipher" "$MNT"
echo "Mounted: $(grep " $MNT " /proc/mounts)"
echo "hello from vaultfs, $(date -u)" > "$MNT/hello.txt"
echo "Read back through the mount: $(cat "$MNT/hello.txt")"
echo "What is stored on disk in $STATE/cipher:"
ls -la "$STATE/cipher"
"$BIN/vaultctl" protector list "$STATE/cipher"
echo "The vault stays mounted at $MNT; unmount with: fusermount3 -u $MNT"

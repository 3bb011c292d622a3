#!/usr/bin/env bash
# Regenerates the golden vaults of format v1. Run once per released format version; the output is
# committed and tests/golden.rs must keep mounting and reading it with every later build.
set -euo pipefail
cd "$(dirname "$0")"
BIN=${BIN:-../../target/debug}
printf 'golden-vault-test-key-32-bytes!!' > key   # test key, not a secret
for suite in gcm xts; do
  d=v1-$suite; rm -rf "$d"; mkdir -p "$d" /tmp/golden-mnt
  "$BIN/vaultctl" init --cipher aes-256-$suite --name golden-$suite --key-file key "$d"
  "$BIN/vaultfs" --key-file key "$d" /tmp/golden-mnt
  m=/tmp/golden-mnt
  printf 'hello golden vault\n' > $m/hello.txt
  : > $m/empty
  printf 'tiny5' > $m/tiny
  mkdir -p $m/dir/nested
  python3 -c 'import sys; sys.stdout.buffer.write(bytes((i*7+3)%256 for i in range(10000)))' > $m/dir/nested/deep.bin
  python3 -c 'f=open("/tmp/golden-mnt/sparse","wb"); f.seek(20000); f.write(b"end")'
  touch "$m/$(printf 'L%.0s' $(seq 1 200))"
  ln -s dir/nested/deep.bin $m/link
  fusermount3 -u $m
done

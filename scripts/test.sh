#!/usr/bin/env bash
# The whole test suite: installs prerequisites, checks formatting and lints, builds, runs every
# test (unit, real FUSE mounts over io_uring and over /dev/fuse, fsx). Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh --test
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
cargo test --workspace
# The mount tests again over /dev/fuse (-o nouring): what a kernel without FUSE over io_uring gets.
VAULTFS_TEST_TRANSPORT=devfuse cargo test --test posix --test fsx --test crash --test tamper

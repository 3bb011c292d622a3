#!/usr/bin/env bash
# The whole test suite: installs prerequisites, checks formatting and lints, builds, runs every
# test (unit, real FUSE mounts, fsx). Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh --test
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
cargo test --workspace

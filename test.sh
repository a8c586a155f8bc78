#!/usr/bin/env bash
# The whole test suite: lints, Rust tests, interop tests with real clients, short fuzz runs.
# On a fresh Debian machine with the Rust toolchain this is all you need to run.
set -euo pipefail
cd "$(dirname "$0")"

scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo build --release"
cargo build --release --bin bexd
echo "== cargo test"
cargo test --all 2>&1 | tee target/cargo-test.log
echo "== interop tests (real clients against target/release/bexd)"
BEXD="$PWD/target/release/bexd" DAEMON=bexd tests/interop/run.sh
if [ -x fuzz/run-short.sh ]; then
  echo "== fuzz (short)"
  fuzz/run-short.sh
fi

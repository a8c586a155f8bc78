#!/usr/bin/env bash
# The whole test suite: lints, docs, the module-cycle check, Rust tests, interop tests with real
# clients against bexd and against qemu-storage-daemon, short fuzz runs.
# On a fresh Debian machine with the Rust toolchain this is all you need to run.
# With CI=true (as .ci/run sets it) nothing may pass without running: a skipped interop test or
# an O_DIRECT test on a filesystem that refuses O_DIRECT fails.
set -euo pipefail
cd "$(dirname "$0")"

# Each section prints a header; at the end (or where it stops) the time each one took.
times=()
current=""
started=0
section() {
  finish_section
  current="$1"
  started=$SECONDS
  echo
  echo "== $current"
}
finish_section() {
  if [ -n "$current" ]; then
    times+=("$(printf '%6ss  %s' $((SECONDS - started)) "$current")")
  fi
  current=""
}
report() {
  local status=$?
  local failed="$current"
  finish_section
  echo
  echo "== times"
  printf '%s\n' "${times[@]}"
  if [ "$status" -ne 0 ]; then
    echo "== FAILED (exit status $status) in: $failed"
  else
    echo "== all passed in ${SECONDS}s"
  fi
}
trap report EXIT

section "install test dependencies"
scripts/install-deps.sh
section "cargo fmt --check"
cargo fmt --all -- --check
section "cargo clippy"
cargo clippy --all-targets -- -D warnings
section "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --quiet
section "module cycles and layering"
python3 scripts/test_modcycles.py
# A module cycle in any crate fails the run (issue 15 removed the last ones).
python3 scripts/modcycles.py
# So does an import the daemon's layering forbids (the NBD server naming the daemon, ...).
python3 scripts/layers.py
section "cargo build --release"
cargo build --release --bin bexd
section "cargo test"
cargo test --all 2>&1 | tee target/cargo-test.log
section "interop tests (real clients against target/release/bexd)"
BEXD="$PWD/target/release/bexd" DAEMON=bexd tests/interop/run.sh tests/interop
# The same tests against qemu-storage-daemon, so that what they expect of bexd is what QEMU does:
# conftest keeps those whose daemon DAEMON picks and leaves out the bexd_only ones.
section "interop tests (the same expectations against qemu-storage-daemon)"
BEXD="$PWD/target/release/bexd" DAEMON=qsd tests/interop/run.sh tests/interop
section "fuzz (short)"
fuzz/run-short.sh
finish_section

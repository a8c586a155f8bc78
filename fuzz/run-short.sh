#!/usr/bin/env bash
# Runs every fuzz target for a short bounded time (FUZZ_SECONDS, default 20 s each).
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 enables them on the stable toolchain.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-20}"
export RUSTC_BOOTSTRAP=1
# New inputs go to a scratch corpus, so a test run leaves the kept corpora (fuzz/corpus/) untouched;
# grow those with a long run by hand (docs/reliability.md).
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo fuzz list); do
  mkdir -p "corpus/$target" "$scratch/$target"
  echo "fuzz: $target for ${seconds}s"
  cargo fuzz run "$target" "$scratch/$target" "corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 2>&1 \
    | grep -E "^(#[0-9]+.*DONE|Done|==[0-9]+==|SUMMARY|thread .* panicked)" || true
  # cargo fuzz exits non-zero on a crash; pipefail is off for grep above, so check artifacts.
  if ls "artifacts/$target"/crash-* >/dev/null 2>&1; then
    echo "fuzz: $target found a crash:"; ls "artifacts/$target"; exit 1
  fi
done
echo "fuzz: all targets ran without crashes"

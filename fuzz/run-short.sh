#!/usr/bin/env bash
# Runs every fuzz target for a short bounded time (FUZZ_SECONDS, default 20 s each) and fails
# when anything is wrong: no targets, a target file not registered in Cargo.toml, a target
# that does not build, libFuzzer exiting non-zero, a run that never reached "Done", or any
# artifact it wrote (crash-, leak-, timeout-, oom-, slow-unit-).
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 enables them on the stable toolchain.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-20}"
# One input running longer than this is a hang (libFuzzer writes timeout-, exits 70); without it
# libFuzzer's default of 1200 s would let a hang eat the CI budget. Slow units (slow-unit-,
# written past -report_slow_units) count as failures too: a parser should never take seconds.
unit_timeout="${FUZZ_UNIT_TIMEOUT:-25}"
export RUSTC_BOOTSTRAP=1

# An assignment, not `for t in $(...)`, so that a failing `cargo fuzz list` stops the script.
targets=$(cargo fuzz list)
if [ -z "$targets" ]; then
  echo "fuzz: cargo fuzz list printed no targets" >&2
  exit 1
fi
# Every file in fuzz_targets/ must be a registered target, or it would silently never run.
for f in fuzz_targets/*.rs; do
  name=$(basename "$f" .rs)
  if ! grep -qx "$name" <<<"$targets"; then
    echo "fuzz: $f is not a [[bin]] in fuzz/Cargo.toml, so it would never run" >&2
    exit 1
  fi
done

echo "fuzz: building $(wc -w <<<"$targets") targets"
cargo fuzz build

# New inputs go to a scratch corpus, so a test run leaves the kept corpora (fuzz/corpus/) untouched;
# grow those with a long run by hand (docs/reliability.md). Artifacts also go to scratch first, so
# that old artifacts from a run by hand neither fail nor hide this run; anything found is then
# copied to artifacts/TARGET/ to be looked at.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for target in $targets; do
  mkdir -p "corpus/$target" "$scratch/$target" "$scratch/artifacts-$target"
  log="$scratch/$target.log"
  echo "fuzz: $target for ${seconds}s"
  status=0
  cargo fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout="$unit_timeout" -rss_limit_mb=2048 -max_len=65536 \
    -artifact_prefix="$scratch/artifacts-$target/" >"$log" 2>&1 || status=$?
  # The summary lines only; the status above is libFuzzer's, not grep's.
  grep -E "^(#[0-9]+.*DONE|Done [0-9]+ runs|==[0-9]+==|SUMMARY|thread .* panicked)" "$log" || true
  artifacts=$(find "$scratch/artifacts-$target" -type f \
    \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'slow-unit-*' \))
  problem=""
  if [ "$status" -ne 0 ]; then
    problem="cargo fuzz run exited with status $status"
  elif [ -n "$artifacts" ]; then
    problem="libFuzzer exited 0 but wrote artifacts"
  elif ! grep -qE "^Done [0-9]+ runs" "$log"; then
    problem="the run never reached libFuzzer's \"Done N runs\""
  fi
  if [ -n "$problem" ]; then
    # The report from its first line (sanitizer, libFuzzer or panic), else the log's end;
    # the whole log and the artifacts are kept in fuzz/artifacts/TARGET/.
    mkdir -p "artifacts/$target"
    cp "$log" "artifacts/$target/run.log"
    echo "fuzz: $target FAILED: $problem; its report (whole log: fuzz/artifacts/$target/run.log):" >&2
    first=$(grep -nE "ERROR: (libFuzzer|[A-Za-z]+Sanitizer)|panicked at|Slowest unit" "$log" \
      | head -n 1 | cut -d: -f1 || true)
    if [ -n "$first" ]; then
      tail -n "+$first" "$log" | head -n 25 >&2
    else
      tail -n 25 "$log" >&2
    fi
    if [ -n "$artifacts" ]; then
      cp $artifacts "artifacts/$target/"
      echo "fuzz: $target wrote, kept in fuzz/artifacts/$target/:" >&2
      for a in $artifacts; do echo "  $(basename "$a")" >&2; done
    fi
    failed+=("$target")
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: all targets ran ${seconds}s each: no crash, leak, timeout, OOM or slow unit"

#!/usr/bin/env bash
# Run Keel's whole test suite: formatting, lints, every test, doc tests.
#
# Installs what it needs first (scripts/install-deps.sh). Every stage runs
# even if an earlier one failed, so one run shows all problems; the script
# exits non-zero if any stage failed.
#
# Environment:
#   KEEL_CRASH_ITERATIONS  simulated power cuts in the crash-consistency test
#                          (default chosen by the test; set higher for a longer run)
#   KEEL_SKIP_DEPS=1       skip package installation
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ -t 1 ]]; then COLOR=always; else COLOR=never; fi

failed_stages=()
tests_passed=0
tests_failed=0
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT

section() {
    printf '\n==============================================================\n'
    printf '==> %s\n' "$*"
    printf '==============================================================\n'
}

# stage NAME CMD...: run CMD with its output also kept in $LOG; record failure.
stage() {
    local name="$1"
    shift
    section "$name: $*"
    local rc=0
    "$@" 2>&1 | tee "$LOG" || rc=$?
    if ((rc != 0)); then
        echo "==> FAILED: $name (exit $rc)"
        failed_stages+=("$name")
    fi
    return 0
}

strip_ansi() { sed -e 's/\x1b\[[0-9;]*[A-Za-z]//g' "$LOG"; }

# Add the counts of nextest's summary line ("N tests run: P passed, F failed, ...").
count_nextest() {
    local line p f
    line="$(strip_ansi | grep -E '^ *Summary \[' | tail -n 1 || true)"
    p="$(grep -oE '[0-9]+ passed' <<<"$line" | grep -oE '[0-9]+' || echo 0)"
    f="$({ grep -oE '[0-9]+ (failed|timed out)' <<<"$line" || true; } |
        awk '{ n += $1 } END { print n + 0 }')"
    tests_passed=$((tests_passed + p))
    tests_failed=$((tests_failed + f))
}

# Add up libtest's "test result: ... P passed; F failed; ..." lines.
count_libtest() {
    local p f
    read -r p f < <(strip_ansi | grep -E '^test result: ' |
        sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed;.*/\1 \2/' |
        awk '{ p += $1; f += $2 } END { print p + 0, f + 0 }')
    tests_passed=$((tests_passed + p))
    tests_failed=$((tests_failed + f))
}

section "Dependencies (scripts/install-deps.sh)"
bash scripts/install-deps.sh

section "Toolchain"
cargo --version
rustc --version
if [[ -n "${KEEL_CRASH_ITERATIONS:-}" ]]; then
    echo "KEEL_CRASH_ITERATIONS=$KEEL_CRASH_ITERATIONS"
else
    echo "KEEL_CRASH_ITERATIONS not set: crash-consistency test uses its default"
fi

stage "Formatting" cargo fmt --all --check

stage "Clippy" cargo clippy --color "$COLOR" --workspace --all-targets -- -D warnings

if cargo nextest --version >/dev/null 2>&1; then
    stage "Tests (nextest)" cargo nextest run --color "$COLOR" --workspace --no-fail-fast
    count_nextest
    have_nextest=1
else
    echo "(cargo-nextest not found: falling back to cargo test)"
    stage "Tests (cargo test)" cargo test --color "$COLOR" --workspace --no-fail-fast
    count_libtest
    have_nextest=0
fi

stage "Doc tests" cargo test --color "$COLOR" --workspace --doc
# Without nextest, `cargo test` above already ran (and counted) the doc tests.
if ((have_nextest)); then count_libtest; fi

section "Summary"
if ((${#failed_stages[@]} > 0)); then
    echo "failed stages: ${failed_stages[*]}"
else
    echo "all stages passed"
fi
echo "tests: $tests_passed passed, $tests_failed failed"
((${#failed_stages[@]} == 0))

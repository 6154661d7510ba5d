#!/usr/bin/env bash
# CI's fuzz smoke run: every cargo-fuzz target for a short while over its committed corpus
# (which stays untouched: new inputs go to a scratch directory), failing on any crash.
#
#   scripts/fuzz-smoke.sh [SECONDS_PER_TARGET]      (default 20)
#
# Needs rustup; installs the nightly toolchain and cargo-fuzz when missing. Where nightly
# cannot be had, it says so and exits 0 (skipped), unless FUZZ_SMOKE_REQUIRED=1.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=${1:-20}
TARGETS=(cluster_frame gguf tokenizer chat_template openai_api config audit_response hf_directory)

# shellcheck source=scripts/fuzz-env.sh
. "$ROOT/scripts/fuzz-env.sh"
if ! fuzz_ensure_tools; then
    if [ "${FUZZ_SMOKE_REQUIRED:-0}" = 1 ]; then
        exit 1
    fi
    echo "fuzz-smoke: SKIPPED (no nightly toolchain or cargo-fuzz; see above)"
    exit 0
fi

(cd fuzz && cargo +nightly fuzz build --sanitizer none)
BIN=$ROOT/fuzz/target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${TARGETS[@]}"; do
    mkdir -p "$scratch/$t" "$scratch/artifacts/$t"
    set +e
    "$BIN/$t" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$scratch/artifacts/$t/" $(fuzz_target_args "$t") \
        "$scratch/$t" "$ROOT/fuzz/corpus/$t" >"$scratch/$t.log" 2>&1
    rc=$?
    set -e
    execs=$(grep -oE '^#[0-9]+' "$scratch/$t.log" | tail -1 | tr -d '#')
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        echo "FAIL $t (exit $rc after ${execs:-0} runs)"
        grep -E 'panicked|ERROR|SUMMARY|deadly' "$scratch/$t.log" | head -5 || true
        mkdir -p "$ROOT/fuzz/artifacts/$t"
        cp "$scratch/artifacts/$t"/* "$ROOT/fuzz/artifacts/$t/" 2>/dev/null || true
        echo "  crash input copied to fuzz/artifacts/$t/; reproduce with:"
        echo "  (cd fuzz && cargo +nightly fuzz run -s none $t artifacts/$t/<file>)"
    else
        echo "ok   $t (${execs:-0} runs in ${SECS}s)"
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz-smoke: crashes in ${failed[*]}"
    exit 1
fi
echo "fuzz-smoke: ${#TARGETS[@]} targets, no crash"

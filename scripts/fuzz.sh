#!/usr/bin/env bash
# A fuzz campaign: build every cargo-fuzz target (fuzz/), run each in turn with a time budget
# and a run cap, minimise its corpus back into fuzz/corpus/<target>, and record executions,
# coverage (libFuzzer's `cov:`), corpus size and crashes in docs/fuzzing.md.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]      (default 900 s, every target)
#
# Environment: FUZZ_RUNS (run cap per target, default 10000000; 0 means no cap),
# FUZZ_SANITIZER (none | address; default none: the parsers are safe Rust, and the campaign
# needs the speed; debug assertions, overflow checks included, are on either way),
# FUZZ_NO_DOCS=1 (print the table, leave docs/fuzzing.md alone), FUZZ_PROCS (fuzzing
# processes per target, default 1; N > 1 runs libFuzzer's -fork=N: N child fuzzers at a time,
# each on a slice of the corpus, whose runs the parent counts against FUZZ_RUNS and whose
# finds it merges into the corpus).
# Targets run one after the other.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=${1:-900}
shift || true
RUNS=${FUZZ_RUNS:-10000000}
SAN=${FUZZ_SANITIZER:-none}
PROCS=${FUZZ_PROCS:-1}
ALL_TARGETS=(cluster_frame gguf tokenizer chat_template openai_api config audit_response hf_directory)
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")

# shellcheck source=scripts/fuzz-env.sh
. "$ROOT/scripts/fuzz-env.sh"
fuzz_ensure_tools || exit 1

echo "== building ${#TARGETS[@]} fuzz targets (sanitizer: $SAN)"
(cd fuzz && cargo +nightly fuzz build --sanitizer "$SAN")
BIN=$ROOT/fuzz/target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release

LOGDIR=$ROOT/fuzz/target/campaign-logs
mkdir -p "$LOGDIR" "$ROOT/fuzz/artifacts"
ROWS=()
FAILED=0
for t in "${TARGETS[@]}"; do
    corpus=$ROOT/fuzz/corpus/$t
    mkdir -p "$corpus" "$ROOT/fuzz/artifacts/$t"
    log=$LOGDIR/$t.log
    args=(-max_total_time="$SECS" -print_final_stats=1 -timeout=10
          -rss_limit_mb=2048 -artifact_prefix="$ROOT/fuzz/artifacts/$t/"
          $(fuzz_target_args "$t"))
    [ "$RUNS" = 0 ] || args+=(-runs="$RUNS")
    [ "$PROCS" -gt 1 ] && args+=(-fork="$PROCS")
    echo "== $t: up to ${SECS}s, ${RUNS} runs, $PROCS process(es)"
    start=$(date +%s)
    set +e
    "$BIN/$t" "${args[@]}" "$corpus" >"$log" 2>&1
    rc=$?
    set -e
    elapsed=$(( $(date +%s) - start ))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    # -fork: the parent prints no final stats; "fuzzed for N iterations" is the count of every
    # child's runs it stopped at, else its last "#N:" line.
    [ -n "$execs" ] || execs=$(sed -n 's/^INFO: fuzzed for \([0-9]*\) iterations.*/\1/p' "$log" | tail -1)
    [ -n "$execs" ] || execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
    ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
    # libFuzzer stops at the first crash, leak, timeout or OOM and writes its input (under
    # -fork the parent prints the crashed child's log).
    crashes=$(grep -c 'Test unit written to' "$log" || true)
    [ "$rc" -ne 0 ] && [ "$crashes" = 0 ] && crashes=1
    # Minimise the corpus in place: keep only inputs that add coverage, cut to the committed size.
    min=$(mktemp -d)
    "$BIN/$t" -merge=1 $(fuzz_target_args "$t" | sed 's/-max_len=[0-9]*//') \
        -max_len="$(fuzz_corpus_max_len "$t")" "$min" "$corpus" >"$LOGDIR/$t.merge.log" 2>&1 || true
    if [ -n "$(ls -A "$min")" ]; then
        find "$corpus" -type f -delete
        cp "$min"/* "$corpus"/
    fi
    rm -rf "$min"
    files=$(find "$corpus" -type f | wc -l)
    kb=$(( ($(find "$corpus" -type f -exec cat {} + | wc -c) + 1023) / 1024 ))
    rate=$(( ${execs:-0} / (elapsed > 0 ? elapsed : 1) ))
    if [ "$crashes" != 0 ]; then
        FAILED=1
        echo "!! $t crashed: $(grep -oE "$ROOT/fuzz/artifacts/$t/[a-z]+-[0-9a-f]+" "$log" | tail -1)"
    fi
    row="| \`$t\` | ${execs:-0} | ${elapsed} | ${rate} | ${cov:-?} | ${ft:-?} | ${files} files, ${kb} KiB | ${crashes} |"
    echo "$row"
    ROWS+=("$row")
done

DATE=$(date -u +%Y-%m-%d)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git status --porcelain -- engine sandbox firewall 2>/dev/null | head -1)
[ -n "$DIRTY" ] && COMMIT="$COMMIT+changes"
TABLE=$(
    procs=""
    [ "$PROCS" -gt 1 ] && procs=", $PROCS processes per target (-fork=$PROCS)"
    echo "### $DATE, engine at \`$COMMIT\`, ${SECS} s and ${RUNS} runs per target at most$procs, sanitizer \`$SAN\`"
    echo
    echo "| target | executions | seconds | exec/s | cov | features | corpus after merge | crashes |"
    echo "|---|---:|---:|---:|---:|---:|---|---:|"
    printf '%s\n' "${ROWS[@]}"
)
echo
echo "$TABLE"
if [ "${FUZZ_NO_DOCS:-0}" != 1 ] && [ -f docs/fuzzing.md ]; then
    # Newest campaign first, right under the marker; older ones stay below as the record.
    python3 - "$TABLE" <<'EOF'
import sys
path = "docs/fuzzing.md"
text = open(path).read()
marker = "<!-- campaigns: scripts/fuzz.sh inserts new results below this line -->"
assert marker in text, f"{path} lacks the campaign marker"
text = text.replace(marker, marker + "\n\n" + sys.argv[1].rstrip() + "\n", 1)
open(path, "w").write(text)
EOF
    echo "recorded in docs/fuzzing.md"
fi
exit $FAILED

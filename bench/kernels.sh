#!/usr/bin/env bash
# Kernel benchmark (kernels/): this machine's read bandwidth (the ceiling for decode) and, per
# kernel path, GB/s of weights streamed and GMAC/s at the model's shapes, then instruction
# counts per call under callgrind, which do not depend on what else the machine is running.
# Prints Markdown; paste into bench/RESULTS.md ("Kernels") with the load it reports.
#   bench/kernels.sh            full run (~2 min of timing, ~2 min of callgrind)
#   KERNELS_NO_CALLGRIND=1 ...  timing only
# Callgrind cannot execute AVX-512 (valgrind hides it from CPUID), so it counts the AVX2 and
# scalar paths; the VNNI paths are timed only.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p kernels --example kernels_bench >/dev/null 2>&1
BIN=./target/release/examples/kernels_bench
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "transparent huge pages: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo unknown)"
echo
$BIN
echo
echo "load after timing: $(cut -d' ' -f1-3 /proc/loadavg)"
[ -n "${KERNELS_NO_CALLGRIND:-}" ] && exit 0
command -v valgrind >/dev/null || { echo "valgrind missing (apt-get install valgrind)"; exit 1; }
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
count() { # calls isa format shape rows -> instructions of the whole run
  valgrind --tool=callgrind --callgrind-out-file="$TMP/cg.out" $BIN --calls "$@" 2>"$TMP/cg.err" >/dev/null
  sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$TMP/cg.err"
}
echo
echo "| weights | shape | act rows | path | instructions per call | per MAC | per weight byte |"
echo "|---|---|---|---|---|---|---|"
while read -r fmt shape rows bytes; do
  for isa in avx2 scalar; do
    [ "$isa" = scalar ] && [ "$rows" -gt 1 ] && continue
    [ "$isa" = scalar ] && [ "$shape" = 49152x576 ] && continue
    a=$(count 1 "$isa" "$fmt" "$shape" "$rows"); b=$(count 11 "$isa" "$fmt" "$shape" "$rows")
    python3 -c "
n=($b-$a)/10; o,k='$shape'.split('x'); macs=int(o)*int(k)*$rows
print(f'| $fmt | $shape | $rows | $isa | {n:,.0f} | {n/macs:.3f} | {n/$bytes:.3f} |')"
  done
done <<'SHAPES'
q4_1 960x576 1 345600
q4_1 960x576 16 345600
q4_1 3072x576 1 1105920
q4_1 576x1536 1 552960
q8_0 49152x576 1 30081024
SHAPES

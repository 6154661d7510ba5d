#!/usr/bin/env bash
# A 2-stage pipeline against one node, on the same two cores, one after the other in one run,
# at 1 and 16 concurrent streaming clients (bench/load.py). Run as root.
#
#   one node:  bulwark on cores 0-1, engine.threads = 2
#   pipeline:  head (API, embedding, layers 0..15) on core 0, engine.threads = 1, in this
#              namespace; worker (layers 15..30, LM head) on core 1, engine.threads = 1, in a
#              network namespace of its own joined by a veth pair (TLS 1.3, mutual certificates)
#
# Writes bench/results/pipeline-<timestamp>.json and prints a Markdown table of ratios
# (pipeline / one node). Everything it creates is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces)" >&2; exit 2; }
MODEL=$(realpath "$(./scripts/fetch-model.sh)")
cargo build --release -p bulwark >/dev/null
BIN=$PWD/target/release/bulwark
NS=bwbench-worker
TMP=$(mktemp -d); [ -n "${BENCH_KEEP:-}" ] && echo "tmp: $TMP" >&2
cleanup() { kill $(jobs -p) 2>/dev/null || true; ip netns del $NS 2>/dev/null || true; ip link del bwbench0 2>/dev/null || true; [ -n "${BENCH_KEEP:-}" ] || rm -rf "$TMP"; }
trap cleanup EXIT
ip netns del $NS 2>/dev/null || true; ip link del bwbench0 2>/dev/null || true
ip netns add $NS
ip link add bwbench0 type veth peer name eth0 netns $NS
ip addr add 10.77.0.1/24 dev bwbench0; ip link set bwbench0 up
ip -n $NS addr add 10.77.0.2/24 dev eth0; ip -n $NS link set eth0 up; ip -n $NS link set lo up

SHA=$($BIN model hash "$MODEL")
$BIN certs ca --dir "$TMP/ca" 2>/dev/null
$BIN certs issue --ca-dir "$TMP/ca" --name head --ip 10.77.0.1 --out "$TMP/head-cert" 2>/dev/null
$BIN certs issue --ca-dir "$TMP/ca" --name worker-1 --ip 10.77.0.2 --out "$TMP/worker-cert" 2>/dev/null
OUT=$($BIN init --dir "$TMP/single" --model "$MODEL" --listen 127.0.0.1:18543 --name smollm2)
KEY=$(echo "$OUT" | tail -n1 | sed 's/^api key: //')
common='[limits]\nrate_limit_per_minute = 0\n[metrics]\nlisten = "127.0.0.1:19564"\n'
printf "\n$common[engine]\nthreads = 2\n" >> "$TMP/single/bulwark.toml"
mkdir -m 700 "$TMP/head"
cp -p "$TMP/single/"{bulwark.toml,cert.pem,key.pem,keys} "$TMP/head/"
sed -i 's/threads = 2/threads = 1/' "$TMP/head/bulwark.toml"
cat >> "$TMP/head/bulwark.toml" <<T
[cluster]
role = "head"
name = "head"
ca = "$TMP/ca/ca.pem"
cert = "$TMP/head-cert/cert.pem"
key = "$TMP/head-cert/key.pem"
layers = [0, 15]
[[cluster.stages]]
name = "worker-1"
address = "10.77.0.2:7070"
layers = [15, 30]
T
cat > "$TMP/worker.toml" <<T
[model]
path = "$MODEL"
sha256 = "$SHA"
name = "smollm2"
[engine]
threads = 1
[cluster]
role = "worker"
name = "worker-1"
ca = "$TMP/ca/ca.pem"
cert = "$TMP/worker-cert/cert.pem"
key = "$TMP/worker-cert/key.pem"
layers = [15, 30]
listen = "10.77.0.2:7070"
head_name = "head"
head_address = "10.77.0.1"
T
chmod 755 "$TMP"
# Ready means a completion is answered (a head answers 503 until its stage is connected).
wait_ready() { for _ in $(seq 300); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' --cacert "$TMP/single/cert.pem" -H "Authorization: Bearer $KEY" \
       -H 'Content-Type: application/json' -d '{"model":"smollm2","prompt":"Hi","max_tokens":1}' \
       https://127.0.0.1:18543/v1/completions)" = 200 ] && return 0; sleep 0.2; done
  echo "not ready; head log:" >&2; tail -5 "$TMP/head.log" "$TMP/worker.log" >&2 2>/dev/null; return 1; }
levels=(${BENCH_LEVELS:-1 16}); reqs=(${BENCH_REQS:-8 32})
results="{}"
run_levels() { # name
  for i in "${!levels[@]}"; do
    r=$(.venv/bin/python bench/load.py --base-url https://127.0.0.1:18543 --api-key "$KEY" --cacert "$TMP/single/cert.pem" \
        --model smollm2 --concurrency ${levels[$i]} --requests ${reqs[$i]})
    echo "$1 c=${levels[$i]}: $r" >&2
    results=$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); d.setdefault(sys.argv[2],[]).append(json.loads(sys.argv[3])); print(json.dumps(d))" "$results" "$1" "$r")
  done
}
taskset -c 0-1 $BIN serve --config "$TMP/single/bulwark.toml" 2>/dev/null & P=$!
wait_ready; run_levels single; kill $P; wait $P 2>/dev/null || true
ip netns exec $NS taskset -c 1 $BIN serve --config "$TMP/worker.toml" 2>"$TMP/worker.log" & W=$!
taskset -c 0 $BIN serve --config "$TMP/head/bulwark.toml" 2>"$TMP/head.log" & H=$!
wait_ready; run_levels pipeline; kill $H $W; wait 2>/dev/null || true
mkdir -p bench/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
echo "$results" > "bench/results/pipeline-$stamp.json"
python3 - "$results" "$(uptime)" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
print("| clients | one node tok/s | 2-stage pipeline tok/s | ratio | p50 TTFT one / pipeline (s) |")
print("|---|---|---|---|---|")
for s, p in zip(d["single"], d["pipeline"]):
    print(f"| {s['concurrency']} | {s['tok_per_s']:.1f} | {p['tok_per_s']:.1f} | **{p['tok_per_s']/s['tok_per_s']:.2f}x** | "
          f"{s['p50_ttft_s']:.3f} / {p['p50_ttft_s']:.3f} |")
print(f"\nload at the end: {sys.argv[2]}")
PY

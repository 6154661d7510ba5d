#!/usr/bin/env bash
# Side-by-side: Bulwark and llama-cpp-python's OpenAI server on the same GGUF, the same cores
# (taskset), one after the other in one run, at 1, 4 and 16 concurrent streaming clients.
# Needs llama-cpp-python[server] (built from source by pip, ~11 min on 2 cores):
#   BENCH_VENV=/path/venv; $BENCH_VENV/bin/pip install 'llama-cpp-python[server]==0.3.36' httpx
# Writes bench/results/<timestamp>.json and prints a Markdown table of ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BENCH_VENV:?set BENCH_VENV to a venv with llama-cpp-python[server] and httpx}
CPUS=${BENCH_CPUS:-0-$(( $(nproc) - 1 ))}
NCPU=$(( $(nproc) ))
MODEL=$(./scripts/fetch-model.sh)
cargo build --release -p bulwark >/dev/null
TMP=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT
OUT=$(./target/release/bulwark init --dir "$TMP/srv" --model "$MODEL" --listen 127.0.0.1:18443 --name smollm2)
KEY=$(echo "$OUT" | tail -n1 | sed 's/^api key: //')
printf '\n[limits]\nrate_limit_per_minute = 0\n[engine]\nthreads = %s\n[metrics]\nlisten = "127.0.0.1:19464"\n' "${BULWARK_THREADS:-$NCPU}" >> "$TMP/srv/bulwark.toml"
wait_port() { for _ in $(seq 600); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.2; done; return 1; }
levels=(1 4 16); reqs=(8 16 32)
results="{}"
run_levels() { # name base-url extra-args...
  local name=$1 url=$2; shift 2
  for i in 0 1 2; do
    r=$("$VENV/bin/python" bench/load.py --base-url "$url" --model smollm2 --concurrency ${levels[$i]} --requests ${reqs[$i]} "$@")
    echo "$name c=${levels[$i]}: $r" >&2
    results=$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); d.setdefault(sys.argv[2],[]).append(json.loads(sys.argv[3])); print(json.dumps(d))" "$results" "$name" "$r")
  done
}
taskset -c "$CPUS" ./target/release/bulwark serve --config "$TMP/srv/bulwark.toml" 2>/dev/null & BPID=$!
wait_port 18443
run_levels bulwark https://127.0.0.1:18443 --api-key "$KEY" --cacert "$TMP/srv/cert.pem"
kill $BPID; wait $BPID 2>/dev/null || true
taskset -c "$CPUS" "$VENV/bin/python" -m llama_cpp.server --model "$MODEL" --model_alias smollm2 --host 127.0.0.1 --port 18800 \
  --n_threads "$NCPU" --n_threads_batch "$NCPU" --n_ctx 4096 --interrupt_requests False >/dev/null 2>&1 & LPID=$!
wait_port 18800
run_levels llamacpp http://127.0.0.1:18800
kill $LPID; wait $LPID 2>/dev/null || true
mkdir -p bench/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
echo "$results" > "bench/results/$stamp.json"
python3 - "$results" "$(uptime)" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
print(f"| clients | Bulwark tok/s | llama.cpp tok/s | ratio | p50 latency ratio | p95 latency ratio | p50 TTFT B / L (s) | TTFT ratio |")
print("|---|---|---|---|---|---|---|---|")
for b, l in zip(d["bulwark"], d["llamacpp"]):
    print(f"| {b['concurrency']} | {b['tok_per_s']:.1f} | {l['tok_per_s']:.1f} | **{b['tok_per_s']/l['tok_per_s']:.2f}x** | "
          f"{b['p50_latency_s']/l['p50_latency_s']:.2f} | {b['p95_latency_s']/l['p95_latency_s']:.2f} | "
          f"{b['p50_ttft_s']:.3f} / {l['p50_ttft_s']:.3f} | {b['p50_ttft_s']/l['p50_ttft_s']:.2f} |")
print(f"\nload at the end: {sys.argv[2]}")
PY

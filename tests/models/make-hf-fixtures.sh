#!/usr/bin/env bash
# The Hugging Face directories the tests load (engine/tests/it/hf.rs, tests/python/test_hf.py),
# written from GGUF files by make_hf_fixture.py into FIXTURES_DIR (default $BULWARK_FIXTURES):
#   smollm2-hf                the demo model, f32, in two shards with an index
#   qwen2-hf, qwen3-hf        the tiny Qwen fixtures of make_fixtures.py, f32
#   llama3-rope-hf            the tiny Llama 3.1 fixture, its rope_freqs.weight as rope_scaling
#   llama-spm-hf              the tiny SentencePiece fixture, a Llama-2-style tokenizer.json
#   llama-hf-bf16, -f16       the tiny llama fixture rounded to bf16 / f16, stored so, and
#   llama-hf-{bf16,f16}-as-f32  the same rounded values stored as f32
# About 20 s and 560 MB. Needs the demo model (scripts/fetch-model.sh) and make_fixtures.py's output.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-${BULWARK_FIXTURES:?set BULWARK_FIXTURES or pass FIXTURES_DIR}}
py=.venv/bin/python
make=tests/models/make_hf_fixture.py
demo=$($py -c 'import json; d = json.load(open("scripts/demo-model.json")); print(d["dir"] + "/" + d["file"])')
$py $make "$demo" "$out/smollm2-hf" --shards 2 >/dev/null
for arch in qwen2 qwen3; do
  $py $make "$out/$arch.gguf" "$out/$arch-hf" >/dev/null
done
# Llama 2's SentencePiece vocabulary as a SentencePiece-style tokenizer.json.
$py $make "$out/llama-spm.gguf" "$out/llama-spm-hf" >/dev/null
# make_fixtures.py's Llama 3.1 rope scaling, now as config.json's rope_scaling.
$py $make "$out/llama3-rope.gguf" "$out/llama3-rope-hf" --llama3-rope 8,1,4,8192 >/dev/null
for half in BF16 F16; do
  lower=$(echo "$half" | tr 'A-Z' 'a-z')
  $py $make "$out/llama.gguf" "$out/llama-hf-$lower" --dtype "$half" --round "$half" >/dev/null
  $py $make "$out/llama.gguf" "$out/llama-hf-$lower-as-f32" --round "$half" >/dev/null
done
echo "$out"

#!/usr/bin/env bash
# llama.cpp's tokenizer test vectors: the vocabulary-only GGUFs it ships with
# (models/ggml-vocab-<name>.gguf) and, for each, inputs (.inp) and the token ids llama.cpp
# gives them (.out), plus the Mistral chat template of the llama-spm fixture. Taken from the
# llama.cpp source vendored in the llama-cpp-python 0.3.36 sdist, which
# scripts/fetch-llama-cpp-sdist.sh fetches, sha256-checked, into the cache that
# bench/build-llama-server.sh shares, $LLAMA_CPP_CACHE (default ~/.cache/bulwark/llama.cpp).
# A full extraction (build-llama-server.sh's) is reused; otherwise only these files are
# extracted, into their own directory, so that build-llama-server.sh never mistakes a partial
# source tree for the whole one. Prints the directory for BULWARK_VOCABS.
set -euo pipefail
CACHE=${LLAMA_CPP_CACHE:-$HOME/.cache/bulwark/llama.cpp}
VERSION=0.3.36
TOP=llama_cpp_python-$VERSION
MODELS=vendor/llama.cpp/models
# The families engine/tests/it/vocab.rs checks, and the llama-spm fixture's template
# (tests/models/make_fixtures.py).
FAMILIES=(llama-spm phi-3 llama-bpe qwen2 qwen35 gpt-2 starcoder refact command-r)
FILES=(templates/mistralai-Mistral-Nemo-Instruct-2407.jinja)
for f in "${FAMILIES[@]}"; do
  FILES+=("ggml-vocab-$f.gguf" "ggml-vocab-$f.gguf.inp" "ggml-vocab-$f.gguf.out")
done

has_all() {
  for f in "${FILES[@]}"; do [ -f "$1/$f" ] || return 1; done
}
for dir in "$CACHE/$TOP/$MODELS" "$CACHE/vocabs-$VERSION"; do
  if has_all "$dir"; then echo "$dir"; exit 0; fi
done

SDIST=$("$(dirname "$0")/../../scripts/fetch-llama-cpp-sdist.sh")
OUT=$CACHE/vocabs-$VERSION
mkdir -p "$OUT"
# llama_cpp_python-0.3.36/vendor/llama.cpp/models/: four levels dropped.
tar -xzf "$SDIST" -C "$OUT" --strip-components=4 "${FILES[@]/#/$TOP/$MODELS/}"
echo "$OUT"

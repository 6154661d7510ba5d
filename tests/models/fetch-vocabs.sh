#!/usr/bin/env bash
# llama.cpp's tokenizer test vectors: the vocabulary-only GGUFs it ships with
# (models/ggml-vocab-<name>.gguf) and, for each, inputs (.inp) and the token ids llama.cpp
# gives them (.out), plus the Mistral chat template of the llama-spm fixture. Taken from the
# llama.cpp source vendored in the llama-cpp-python 0.3.36 sdist, fetched as
# bench/build-llama-server.sh fetches it (PyPI is the only registry reachable here) into the
# same cache, $LLAMA_CPP_CACHE (default ~/.cache/bulwark/llama.cpp), and checked against its
# sha256 before anything is extracted. A full extraction (build-llama-server.sh's) is reused;
# otherwise only these files are extracted, into their own directory, so that
# build-llama-server.sh never mistakes a partial source tree for the whole one. Prints the
# directory for BULWARK_VOCABS.
set -euo pipefail
CACHE=${LLAMA_CPP_CACHE:-$HOME/.cache/bulwark/llama.cpp}
VERSION=0.3.36
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
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

mkdir -p "$CACHE"
SDIST=$CACHE/$TOP.tar.gz
if [ ! -f "$SDIST" ]; then
  [ -x "$CACHE/venv/bin/pip" ] || python3 -m venv "$CACHE/venv" >&2
  "$CACHE/venv/bin/pip" install --quiet --disable-pip-version-check scikit-build-core >&2
  "$CACHE/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
    --no-binary :all: --no-build-isolation --dest "$CACHE" "llama-cpp-python==$VERSION" >&2
fi
if ! echo "$SDIST_SHA256  $SDIST" | sha256sum --check --quiet - >&2; then
  echo "$SDIST: sha256 is not $SDIST_SHA256; refusing to extract it" >&2
  exit 1
fi
OUT=$CACHE/vocabs-$VERSION
mkdir -p "$OUT"
# llama_cpp_python-0.3.36/vendor/llama.cpp/models/: four levels dropped.
tar -xzf "$SDIST" -C "$OUT" --strip-components=4 "${FILES[@]/#/$TOP/$MODELS/}"
echo "$OUT"

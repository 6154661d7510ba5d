#!/usr/bin/env bash
# Build the CPU peer, llama.cpp's own C++ `llama-server` (and `llama-quantize`), from the
# llama.cpp source vendored in the llama-cpp-python 0.3.36 sdist, which
# scripts/fetch-llama-cpp-sdist.sh fetches, sha256-checked, from PyPI (the only registry
# reachable here). Cached outside the repository under $LLAMA_CPP_CACHE (default
# ~/.cache/bulwark/llama.cpp); prints the directory holding the binaries. About 6 minutes on
# 2 cores the first time, instant afterwards.
set -euo pipefail
CACHE=${LLAMA_CPP_CACHE:-$HOME/.cache/bulwark/llama.cpp}
VERSION=0.3.36
SRC=$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp
BIN=$SRC/build/bin
if [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-quantize" ]; then
  echo "$BIN"; exit 0
fi
if ! command -v cmake >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 && apt-get install -y -qq cmake >/dev/null
fi
if [ ! -d "$SRC" ]; then
  SDIST=$("$(dirname "$0")/../scripts/fetch-llama-cpp-sdist.sh")
  tar -xzf "$SDIST" -C "$CACHE"
fi
# GGML_NATIVE: the peer gets every instruction this CPU has (AVX-512 VNNI here), as it would
# when a user builds it for their own machine.
cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_CURL=OFF -DGGML_NATIVE=ON >&2
cmake --build "$SRC/build" --target llama-server llama-quantize -j"$(nproc)" >&2
echo "$BIN"

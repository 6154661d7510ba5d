#!/usr/bin/env bash
# The llama-cpp-python 0.3.36 source distribution, whose vendor/llama.cpp is the llama.cpp
# every comparison here is made against (bench/build-llama-server.sh builds llama-server from
# it; tests/models/fetch-vocabs.sh takes llama.cpp's tokenizer test vectors from it). Fetched
# from PyPI's file host at its pinned address into $LLAMA_CPP_CACHE (default
# ~/.cache/bulwark/llama.cpp) and checked against its sha256 before it is kept; prints its path.
# Not `pip download`: for a source distribution pip first prepares its metadata, which runs
# scikit-build-core and fails on a machine without CMake, though nothing is built here.
set -euo pipefail
CACHE=${LLAMA_CPP_CACHE:-$HOME/.cache/bulwark/llama.cpp}
FILE=llama_cpp_python-0.3.36.tar.gz
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
# The address PyPI's simple index (https://pypi.org/simple/llama-cpp-python/) gives the file.
URL=https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/$FILE
SDIST=$CACHE/$FILE
verified() { echo "$SHA256  $1" | sha256sum --check --status -; }
if [ -f "$SDIST" ] && verified "$SDIST"; then echo "$SDIST"; exit 0; fi
mkdir -p "$CACHE"
python3 - "$URL" "$SDIST.part" <<'PY'
import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=180) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! verified "$SDIST.part"; then
  echo "$URL: sha256 is not $SHA256; refusing it" >&2
  rm -f "$SDIST.part"
  exit 1
fi
mv "$SDIST.part" "$SDIST"
echo "$SDIST"

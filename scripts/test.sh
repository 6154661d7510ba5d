#!/usr/bin/env bash
# Every test: the Nix checks, formatting, lints, unit and integration tests (real model), the
# OpenAI-client, transport and abuse tests against a real server, the netns lab topologies,
# and a short run of every fuzz target. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/nix-check.sh
./scripts/fetch-model.sh >/dev/null
BULWARK_VOCABS=$(tests/models/fetch-vocabs.sh); export BULWARK_VOCABS
# The tiny per-architecture models the llama.cpp comparison runs on (tests/models/).
BULWARK_FIXTURES=$(.venv/bin/python tests/models/make_fixtures.py)
export BULWARK_FIXTURES
# The same models and the demo model as Hugging Face directories (safetensors).
tests/models/make-hf-fixtures.sh >/dev/null
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo build --release --workspace
cargo test --release --workspace
.venv/bin/python -m pytest -q tests/python
for t in vm-tests/topologies/*.toml; do python3 vm-tests/lab.py "$t"; done
./scripts/fuzz-smoke.sh 10
echo "all tests passed"

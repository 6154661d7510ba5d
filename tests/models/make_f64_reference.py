#!/usr/bin/env python3
"""The exact first-token log-probabilities of the fixture models, for Bulwark's test.

For each fixture of engine/tests/data/families-reference.json and each of its prompts, the
float64 forward pass of tests/reference/f64_forward.py (no rounding but float64's, nothing
quantized but the weights themselves) gives the five most likely first tokens and their
log-probabilities. Bulwark's f32 path, which quantizes no activation either, must agree with
them to rounding: a much tighter check of each architecture's arithmetic than the comparison
with llama.cpp, whose 8-bit activations move results by tenths of a nat.

Usage: make_f64_reference.py [FIXTURES_DIR] > engine/tests/data/families-f64.json
FIXTURES_DIR defaults to $BULWARK_FIXTURES or ~/.cache/bulwark/fixtures.
"""
import hashlib
import json
import os
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests/reference"))
from f64_forward import Reference  # noqa: E402  (tests/reference/f64_forward.py)


def main():
    default = os.environ.get("BULWARK_FIXTURES") or pathlib.Path.home() / ".cache/bulwark/fixtures"
    fixtures = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else default)
    recorded = json.loads((ROOT / "engine/tests/data/families-reference.json").read_text())
    out = {"generator": "tests/models/make_f64_reference.py (float64 over dequantized tensors)",
           "fixtures": []}
    for f in recorded["fixtures"]:
        path = fixtures / f["file"]
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        if sha != f["sha256"]:
            raise SystemExit(f"{path}: sha256 {sha} is not the recorded {f['sha256']}")
        ref = Reference(path)
        cases = []
        for case in f["cases"]:
            lp = ref.logprobs(case["prompt_ids"])
            top = [[int(i), round(float(lp[i]), 6)] for i in np.argsort(-lp)[:5]]
            cases.append({"prompt_ids": case["prompt_ids"], "first_top5": top})
        out["fixtures"].append({"file": f["file"], "sha256": sha, "cases": cases})
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

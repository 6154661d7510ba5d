#!/usr/bin/env python3
"""Produce llama.cpp's greedy continuations of the reference prompts, for Bulwark's test.

For each chat case of engine/tests/data/llamacpp-reference.json (its prompt token ids, so the
tokenization is the one already checked), llama.cpp's own `llama-server` decodes 32 tokens
greedily and reports, at every step, the chosen token and its two most likely tokens with
their log-probabilities. Bulwark's test (engine/tests/it/reference.rs) decodes the same prompts
and must choose the same tokens up to the first step where llama.cpp's top two are a near tie.
A case whose first step differs from llama-cpp-python's reference is marked inconsistent.

The server runs as llama-cpp-python ran for the first reference: flash attention off (f16 KV
cache), one slot, two threads, no prompt cache.

Usage: python make_greedy_reference.py LLAMA_BIN_DIR MODEL.gguf > engine/tests/data/llamacpp-greedy.json
LLAMA_BIN_DIR is what bench/build-llama-server.sh prints.
"""
import json
import pathlib
import sys

import llama_server  # tests/reference/llama_server.py

STEPS = 32
PORT = 18802
ROOT = pathlib.Path(__file__).resolve().parents[2]


def main():
    bin_dir, model = pathlib.Path(sys.argv[1]), sys.argv[2]
    cases = json.loads((ROOT / "engine/tests/data/llamacpp-reference.json").read_text())["chat"]
    with llama_server.running(bin_dir, model, PORT, "-t", "2", "-np", "1", "-c", "2048",
                              "-fa", "off") as server:
        out = {"generator": "llama-server (llama.cpp vendored in llama-cpp-python 0.3.36), -fa off",
               "model_sha256": json.loads((ROOT / "scripts/demo-model.json").read_text())["sha256"],
               "cases": []}
        for case in cases:
            r = server.post("/completion", {"prompt": case["prompt_ids"], "n_predict": STEPS,
                                            "temperature": 0, "n_probs": 2, "cache_prompt": False})
            steps = [{"id": p["id"], "top2": [[t["id"], t["logprob"]] for t in p["top_logprobs"]]}
                     for p in r["completion_probabilities"]]
            # llama-server and llama-cpp-python run the same llama.cpp; where their first-step
            # log-probabilities differ the case says so rather than being a reference for
            # anybody. (llama-server reports no probabilities for a token that ends inside a
            # UTF-8 character, which shifts the steps of a case that starts with one.)
            first = {t["id"]: t["logprob"] for t in case["top"]}
            consistent = all(abs(first.get(i, 0.0) - lp) < 0.01 for i, lp in steps[0]["top2"])
            out["cases"].append({"prompt_ids": case["prompt_ids"], "text": r["content"],
                                 "consistent": consistent, "steps": steps})
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main()

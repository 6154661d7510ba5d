#!/usr/bin/env python3
"""Record what llama.cpp computes on the fixture models, one reference per architecture.

For each fixture that make_fixtures.py writes, llama.cpp's own `llama-server` tokenizes three
prompts in the fixture's chat format (special tokens parsed, BOS added when the model asks
for it) and decodes 8 tokens greedily from each, reporting the first
step's five most likely tokens and, at every step, the chosen token with the two most likely
and their log-probabilities. Bulwark's test loads the same fixture, and compares only when the
fixture's sha256 is the one recorded here: different bytes are a different model.

The server runs as for the demo model's reference: flash attention off (f16 KV cache), one
slot, two threads, no prompt cache.

Usage: python make_reference.py LLAMA_BIN_DIR FIXTURES_DIR > engine/tests/data/families-reference.json
LLAMA_BIN_DIR is what bench/build-llama-server.sh prints; FIXTURES_DIR what make_fixtures.py prints.
"""
import hashlib
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "reference"))
import llama_server  # noqa: E402  (tests/reference/llama_server.py)

STEPS = 8
TOP_FIRST = 5
PORT = 18803
PLAIN_PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,"]
CHATML_PROMPTS = ["<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
                  *PLAIN_PROMPTS]
# Mistral's [INST] format, as llama-spm.gguf's template writes it (BOS comes from add_bos).
INST_PROMPTS = ["[INST]Hello there[/INST]", *PLAIN_PROMPTS]
FIXTURES = [("llama.gguf", "llama", CHATML_PROMPTS),
            ("llama3-rope.gguf", "llama", CHATML_PROMPTS),
            ("qwen2.gguf", "qwen2", CHATML_PROMPTS),
            ("qwen3.gguf", "qwen3", CHATML_PROMPTS),
            ("llama-spm.gguf", "llama", INST_PROMPTS),
            ("llama-q4_0.gguf", "llama", CHATML_PROMPTS),
            ("llama-q5_0.gguf", "llama", CHATML_PROMPTS),
            ("llama-q5_1.gguf", "llama", CHATML_PROMPTS),
            ("llama-f16.gguf", "llama", CHATML_PROMPTS)]


def pairs(top):
    # six decimals is float32's precision at these magnitudes, and keeps the file small
    return [[t["id"], round(t["logprob"], 6)] for t in top]


def reference(bin_dir, path, prompts):
    with llama_server.running(bin_dir, path, PORT, "-t", "2", "-np", "1", "-c", "512",
                              "-fa", "off") as server:
        cases = []
        for text in prompts:
            ids = server.post("/tokenize", {"content": text, "parse_special": True,
                                            "add_special": True})["tokens"]
            r = server.post("/completion", {"prompt": ids, "n_predict": STEPS, "temperature": 0,
                                            "n_probs": TOP_FIRST, "cache_prompt": False})
            probs = r["completion_probabilities"]
            cases.append({"text": text, "prompt_ids": ids,
                          "first_top5": pairs(probs[0]["top_logprobs"]),
                          "steps": [{"id": p["id"], "top2": pairs(p["top_logprobs"][:2])}
                                    for p in probs]})
        return cases


def main():
    bin_dir, fixtures = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    out = {"generator": "llama-server (llama.cpp vendored in llama-cpp-python 0.3.36), -fa off, "
                        "fixtures from tests/models/make_fixtures.py",
           "fixtures": []}
    for name, arch, prompts in FIXTURES:
        path = fixtures / name
        out["fixtures"].append({"file": name,
                                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                "architecture": arch, "cases": reference(bin_dir, path, prompts)})
    # one line per case keeps the file a few KB and its diffs readable
    lines = ["{", f' "generator": {json.dumps(out["generator"])},', ' "fixtures": [']
    for i, fixture in enumerate(out["fixtures"]):
        head = {k: v for k, v in fixture.items() if k != "cases"}
        lines.append("  " + json.dumps(head)[:-1] + ', "cases": [')
        cases = [json.dumps(c, ensure_ascii=False) for c in fixture["cases"]]
        lines.append(",\n".join("   " + c for c in cases))
        lines.append("  ]}" + ("," if i + 1 < len(out["fixtures"]) else ""))
    lines += [" ]", "}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()

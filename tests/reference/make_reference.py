#!/usr/bin/env python3
"""Produce llama.cpp reference data for Bulwark's correctness test.

An independent implementation (llama.cpp through llama-cpp-python, with jinja2 rendering the
GGUF's own chat template) gives, for each conversation:
  - the token ids of the rendered chat prompt,
  - the top-5 tokens and log-probabilities at the first generated position;
and for raw strings, their token ids. Bulwark's test (engine/tests/it/reference.rs) checks the
ids are identical and the log-probabilities agree within a stated tolerance.

Usage: python make_reference.py MODEL.gguf > engine/tests/data/llamacpp-reference.json
Needs: pip install llama-cpp-python==0.3.36 numpy jinja2 (builds llama.cpp from source).
"""
import json
import pathlib
import sys

import jinja2
import numpy as np
from llama_cpp import Llama, __version__ as llama_cpp_version

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a short story about a robot learning to paint."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Tell me a fun fact about octopuses."}],
    [{"role": "user", "content": "Translate 'good morning' to Japanese (おはよう?) 🌅 and add 12345 + 678."}],
]

RAW_TEXTS = [
    "Once upon a time",
    "  leading spaces and\ttabs\nnewlines\n\n",
    "Numbers: 3.14159, 2026-11-22, 1000000",
    "Unicode: naïve café — 東京 🚀 emoji 👩‍💻",
    "def f(x):\n    return x ** 2  # square",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
]

TOP_K = 5


def main():
    path = sys.argv[1]
    llm = Llama(model_path=path, n_ctx=2048, n_threads=2, n_batch=512, logits_all=True,
                seed=0, verbose=False)
    meta = llm.metadata
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
    template = env.from_string(meta["tokenizer.chat_template"])
    out = {
        "generator": f"llama-cpp-python {llama_cpp_version}",
        "model_sha256": json.loads(
            (pathlib.Path(__file__).resolve().parents[2] / "scripts/demo-model.json").read_text())["sha256"],
        "chat": [],
        "raw": [],
    }
    for messages in CONVERSATIONS:
        prompt = template.render(messages=messages, add_generation_prompt=True,
                                 bos_token="<|im_start|>", eos_token="<|im_end|>")
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
        logprobs = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        top = np.argsort(-logprobs)[:TOP_K]
        out["chat"].append({
            "messages": messages,
            "rendered": prompt,
            "prompt_ids": ids,
            "top": [{"id": int(t), "logprob": float(logprobs[t])} for t in top],
        })
    for text in RAW_TEXTS:
        out["raw"].append({"text": text,
                           "ids": llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)})
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main()

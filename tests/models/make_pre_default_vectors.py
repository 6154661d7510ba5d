#!/usr/bin/env python3
"""llama.cpp's token ids for its GPT-2 test vocabulary read with `tokenizer.ggml.pre` "default"
(the pre-tokenizer llama.cpp falls back to for a file that names none): llama.cpp ships no test
vectors for it, so they are made here with llama.cpp's own `llama-tokenize` over the inputs of
ggml-vocab-gpt-2.gguf.inp, and committed as engine/tests/data/vocab-pre-default.json.

  bin=$(bench/build-llama-server.sh)     # then: cmake --build <its build dir> --target llama-tokenize
  .venv/bin/python tests/models/make_pre_default_vectors.py "$bin" "$(tests/models/fetch-vocabs.sh)" \\
      > engine/tests/data/vocab-pre-default.json

engine/tests/it/vocab.rs reads the same vocabulary, sets the key in memory, and must give these ids.
"""
import json
import pathlib
import subprocess
import sys
import tempfile

from gguf import GGUFReader, GGUFValueType, GGUFWriter

VOCAB = "ggml-vocab-gpt-2.gguf"
SEPARATOR = "\n__ggml_vocab_test__\n"


def copy_with_default_pre(src, dst):
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = "default" if key == "tokenizer.ggml.pre" else field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def ids_of(tokenize, model, text):
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write(text)
        f.flush()
        out = subprocess.run([tokenize, "-m", model, "-f", f.name, "--ids", "--no-bos",
                              "--no-escape", "--log-disable"], check=True, capture_output=True,
                             text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    bin_dir, vocabs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    inputs = (vocabs / f"{VOCAB}.inp").read_text().split(SEPARATOR)
    if inputs[-1] == "":  # the file ends with a separator (as vocab.rs reads it)
        inputs.pop()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(pathlib.Path(tmp) / "pre-default.gguf")
        copy_with_default_pre(vocabs / VOCAB, model)
        cases = [{"text": t, "ids": ids_of(bin_dir / "llama-tokenize", model, t)} for t in inputs]
    doc = {"generator": "tests/models/make_pre_default_vectors.py: llama-tokenize (llama.cpp "
                        "vendored in llama-cpp-python 0.3.36), add_special and parse_special off",
           "vocab": VOCAB, "pre": "default", "cases": cases}
    lines = ["{"] + [f' "{k}": {json.dumps(v)},' for k, v in doc.items() if k != "cases"]
    lines.append(' "cases": [')
    lines.append(",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases))
    lines += [" ]", "}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()

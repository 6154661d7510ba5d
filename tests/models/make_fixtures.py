#!/usr/bin/env python3
"""Write tiny random-weight GGUF models, one per architecture Bulwark loads, deterministically.

Each fixture has the demo model's tokenizer and chat template (SmolLM2: byte-level BPE, pre
"smollm", 49152 tokens), except llama-spm.gguf, which has Llama 2's SentencePiece vocabulary
(32000 tokens, from llama.cpp's ggml-vocab-llama-spm.gguf) and a Mistral [INST] template;
all have a two-block transformer of width 64 (4 query heads, 2 key/value heads of 16,
feed-forward 128). Matrices are Q8_0 (other types in llama-<type>.gguf), norms, biases and
rope factors F32, as in
the GGUF files llama.cpp's converter writes, so that one llama.cpp run per fixture
(make_reference.py) gives a reference for each architecture's loader and forward pass.

  llama.gguf        llama, tied output (like the demo model), no rope_freqs
  llama3-rope.gguf  llama with Llama 3.1 rope_freqs, freq_base 500000, untied output.weight
  qwen2.gguf        qwen2: Q/K/V biases, tied output
  qwen3.gguf        qwen3: per-head Q/K RMS norms, no biases, tied output
  llama-spm.gguf    llama as llama.gguf, with a SentencePiece tokenizer
  llama-q4_0.gguf, llama-q5_0.gguf, llama-q5_1.gguf, llama-f16.gguf
                    llama.gguf's weights with every matrix in another block type

The same bytes come out on every run and every machine: weights are drawn from PCG64's raw
stream (numpy keeps bit generators' streams stable across versions; its distributions it does
not) and made roughly normal with exact arithmetic; quantization is gguf-py's port of ggml's
reference quantizers (Q8_0, Q4_0, Q5_0, Q5_1), which is exact float arithmetic too. The Rust test pins each fixture by the sha256 the
reference recorded, so a fixture that came out different is refused and the test fails.

Usage: make_fixtures.py [OUT_DIR] [--demo DEMO.gguf] [--vocabs VOCABS_DIR]
OUT_DIR defaults to $BULWARK_FIXTURES or ~/.cache/bulwark/fixtures; DEMO.gguf to the file
scripts/fetch-model.sh fetches (it only reads it); VOCABS_DIR, which holds
ggml-vocab-llama-spm.gguf and the template, to $BULWARK_VOCABS or where
tests/models/fetch-vocabs.sh puts them. Prints OUT_DIR.
"""
import argparse
import json
import math
import os
import pathlib
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import quantize

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO = json.loads((ROOT / "scripts/demo-model.json").read_text())  # the one place it is written

# Shapes shared by every fixture: head_dim = EMBD / HEADS = 16.
EMBD = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = EMBD // HEADS
FFN = 128
BLOCKS = 2
CONTEXT = 512
RMS_EPS = 1e-6

# Scales: projections of about 1/sqrt(n_in) keep activations near unit size through the
# blocks, so that every block moves the logits; a large embedding/output scale spreads the
# first token's top-5 log-probabilities over a few nats instead of a near-uniform 49152-way tie.
MATRIX_STD = 0.15
EMBD_STD = 0.5
NORM_STD = 0.1
BIAS_STD = 0.3

# Llama 3.1's rope_scaling, as convert_hf_to_gguf.py (conversion/llama.py) turns it into
# rope_freqs.weight.
LLAMA3_FREQ_BASE = 500000.0
LLAMA3_FACTOR = 8.0
LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_HIGH_FREQ_FACTOR = 4.0
LLAMA3_ORIGINAL_CONTEXT = 8192

# llama-spm.gguf's tokenizer and chat template, from llama.cpp's test vocabularies
# (tests/models/fetch-vocabs.sh): Llama 2's vocabulary, and Mistral's [INST] format (the
# llama.cpp sdist has no Llama 2 template; Mistral 7B uses the same vocabulary shape).
SPM_VOCAB = "ggml-vocab-llama-spm.gguf"
SPM_TEMPLATE = "templates/mistralai-Mistral-Nemo-Instruct-2407.jinja"
LLAMA_CPP_SDIST = "llama_cpp_python-0.3.36"


class Weights:
    """A seeded stream of roughly normal float32 arrays.

    Each value is the Irwin-Hall sum of four 16-bit uniforms taken from PCG64's raw output:
    integers summed, centred and scaled in float32, so no libm call decides a bit.
    """

    # mean and standard deviation of the sum of four uniforms on {0, ..., 65535}
    MEAN = 4 * 32767.5
    STD = math.sqrt(4 * (65536**2 - 1) / 12)

    def __init__(self, seed):
        self.bits = np.random.PCG64(seed)

    def normal(self, shape, std, mean=0.0):
        n = int(np.prod(shape))
        raw = self.bits.random_raw(n)
        lanes = [(raw >> np.uint64(16 * i)) & np.uint64(0xFFFF) for i in range(4)]
        total = (lanes[0] + lanes[1] + lanes[2] + lanes[3]).astype(np.float32)
        unit = (total - np.float32(self.MEAN)) * np.float32(1.0 / self.STD)
        return (unit * np.float32(std) + np.float32(mean)).reshape(shape)


def llama3_rope_factors():
    """Frequency factors per rotated pair, computed as conversion/llama.py does."""
    # float64 in Python rather than the converter's float32 torch: the same factors to float32
    # precision, without a vectorised powf whose last bit may depend on the CPU.
    freqs = [1.0 / LLAMA3_FREQ_BASE ** (i / HEAD_DIM) for i in range(0, HEAD_DIM, 2)]
    low_freq_wavelen = LLAMA3_ORIGINAL_CONTEXT / LLAMA3_LOW_FREQ_FACTOR
    high_freq_wavelen = LLAMA3_ORIGINAL_CONTEXT / LLAMA3_HIGH_FREQ_FACTOR
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(LLAMA3_FACTOR)
        else:
            smooth = ((LLAMA3_ORIGINAL_CONTEXT / wavelen - LLAMA3_LOW_FREQ_FACTOR)
                      / (LLAMA3_HIGH_FREQ_FACTOR - LLAMA3_LOW_FREQ_FACTOR))
            factors.append(1 / ((1 - smooth) / LLAMA3_FACTOR + smooth))
    return np.array(factors, dtype=np.float32)


def tokenizer_fields(demo):
    """Every tokenizer.ggml.* key and the chat template of the demo GGUF, in file order,
    as (key, value, type, sub_type) with strings as raw bytes so nothing is re-encoded."""
    reader = GGUFReader(demo)
    fields = []
    for key, field in reader.fields.items():
        if not (key.startswith("tokenizer.ggml.") or key == "tokenizer.chat_template"):
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == GGUFValueType.STRING:
                value = [field.parts[i].tobytes() for i in field.data]
            else:
                value = field.contents()
            fields.append((key, value, vtype, sub))
        elif vtype == GGUFValueType.STRING:
            fields.append((key, field.parts[field.data[0]].tobytes(), vtype, None))
        else:
            fields.append((key, field.contents(), vtype, None))
    vocab = next(len(v) for k, v, _, _ in fields if k == "tokenizer.ggml.tokens")
    return fields, vocab


def default_vocabs():
    """Where fetch-vocabs.sh leaves the vocabularies: $BULWARK_VOCABS, else its two places."""
    if os.environ.get("BULWARK_VOCABS"):
        return pathlib.Path(os.environ["BULWARK_VOCABS"])
    cache = pathlib.Path(os.environ.get("LLAMA_CPP_CACHE")
                         or pathlib.Path.home() / ".cache/bulwark/llama.cpp")
    full = cache / LLAMA_CPP_SDIST / "vendor/llama.cpp/models"
    return full if (full / SPM_VOCAB).is_file() else cache / "vocabs-0.3.36"


def spm_tokenizer_fields(vocabs):
    """Llama 2's tokenizer keys with the Mistral template as tokenizer.chat_template."""
    fields, vocab = tokenizer_fields(vocabs / SPM_VOCAB)
    fields = [f for f in fields if f[0] != "tokenizer.chat_template"]
    template = (vocabs / SPM_TEMPLATE).read_bytes()
    fields.append(("tokenizer.chat_template", template, GGUFValueType.STRING, None))
    return fields, vocab


# The matrix types written: each fixture's matrices (embedding included) in one of them, with
# the file type llama.cpp's converter would state for it.
MATRIX_TYPES = {
    "Q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "Q5_0": (GGMLQuantizationType.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "Q5_1": (GGMLQuantizationType.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "F16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
}


def write_fixture(path, arch, name, seed, tokenizer, vocab, *, freq_base, rope_freqs=False,
                  untied_output=False, qkv_bias=False, qk_norm=False, vocab_size_key=False,
                  head_dim_keys=False, matrix_type="Q8_0"):
    qtype, file_type = MATRIX_TYPES[matrix_type]
    w = Weights(seed)
    tmp = path.with_suffix(".part")
    writer = GGUFWriter(tmp, arch)  # writes general.architecture first
    writer.add_name(name)
    writer.add_custom_alignment(32)  # the GGUF default, stated
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(EMBD)
    writer.add_block_count(BLOCKS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    if head_dim_keys:
        writer.add_key_length(HEAD_DIM)
        writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(freq_base)
    if vocab_size_key:
        writer.add_vocab_size(vocab)
    for key, value, vtype, sub in tokenizer:
        writer.add_key_value(key, value, vtype, sub_type=sub)

    # numpy (n_out, n_in) is ggml ne = [n_in, n_out]
    def matrix(tensor, n_out, n_in, std=MATRIX_STD):
        q = quantize(w.normal((n_out, n_in), std), qtype)
        writer.add_tensor(tensor, q, raw_dtype=qtype)

    def vector(tensor, n, std, mean=0.0):
        writer.add_tensor(tensor, w.normal((n,), std, mean))

    if rope_freqs:
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors())
    matrix("token_embd.weight", vocab, EMBD, EMBD_STD)
    for i in range(BLOCKS):
        b = f"blk.{i}"
        vector(f"{b}.attn_norm.weight", EMBD, NORM_STD, 1.0)
        matrix(f"{b}.attn_q.weight", HEADS * HEAD_DIM, EMBD)
        matrix(f"{b}.attn_k.weight", KV_HEADS * HEAD_DIM, EMBD)
        matrix(f"{b}.attn_v.weight", KV_HEADS * HEAD_DIM, EMBD)
        if qkv_bias:
            vector(f"{b}.attn_q.bias", HEADS * HEAD_DIM, BIAS_STD)
            vector(f"{b}.attn_k.bias", KV_HEADS * HEAD_DIM, BIAS_STD)
            vector(f"{b}.attn_v.bias", KV_HEADS * HEAD_DIM, BIAS_STD)
        if qk_norm:
            vector(f"{b}.attn_q_norm.weight", HEAD_DIM, NORM_STD, 1.0)
            vector(f"{b}.attn_k_norm.weight", HEAD_DIM, NORM_STD, 1.0)
        matrix(f"{b}.attn_output.weight", EMBD, HEADS * HEAD_DIM)
        vector(f"{b}.ffn_norm.weight", EMBD, NORM_STD, 1.0)
        matrix(f"{b}.ffn_gate.weight", FFN, EMBD)
        matrix(f"{b}.ffn_up.weight", FFN, EMBD)
        matrix(f"{b}.ffn_down.weight", EMBD, FFN)
    vector("output_norm.weight", EMBD, NORM_STD, 1.0)
    if untied_output:
        matrix("output.weight", vocab, EMBD, EMBD_STD)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)


def main():
    default_out = os.environ.get("BULWARK_FIXTURES") or pathlib.Path.home() / ".cache/bulwark/fixtures"
    default_demo = pathlib.Path(os.environ.get("BULWARK_MODEL_DIR") or ROOT / DEMO["dir"]) / DEMO["file"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=default_out, type=pathlib.Path)
    ap.add_argument("--demo", default=default_demo, type=pathlib.Path,
                    help="demo GGUF whose tokenizer is copied (scripts/fetch-model.sh)")
    ap.add_argument("--vocabs", default=default_vocabs(), type=pathlib.Path,
                    help=f"directory of {SPM_VOCAB} and {SPM_TEMPLATE} "
                         "(tests/models/fetch-vocabs.sh)")
    args = ap.parse_args()
    if not args.demo.is_file():
        sys.exit(f"{args.demo}: not found; run scripts/fetch-model.sh first")
    if not (args.vocabs / SPM_VOCAB).is_file():
        sys.exit(f"{args.vocabs / SPM_VOCAB}: not found; run tests/models/fetch-vocabs.sh first")

    tokenizer, vocab = tokenizer_fields(args.demo)
    args.out.mkdir(parents=True, exist_ok=True)
    common = dict(tokenizer=tokenizer, vocab=vocab)
    write_fixture(args.out / "llama.gguf", "llama", "bulwark-fixture-llama", 1,
                  freq_base=10000.0, vocab_size_key=True, **common)
    write_fixture(args.out / "llama3-rope.gguf", "llama", "bulwark-fixture-llama3-rope", 2,
                  freq_base=LLAMA3_FREQ_BASE, rope_freqs=True, untied_output=True,
                  vocab_size_key=True, **common)
    write_fixture(args.out / "qwen2.gguf", "qwen2", "bulwark-fixture-qwen2", 3,
                  freq_base=1000000.0, qkv_bias=True, **common)
    write_fixture(args.out / "qwen3.gguf", "qwen3", "bulwark-fixture-qwen3", 4,
                  freq_base=1000000.0, qk_norm=True, head_dim_keys=True, **common)
    # llama.gguf's weights (the same seed) in the other block types llama.cpp serves: Q4_0 runs
    # on the packed path like Q8_0; Q5_0, Q5_1 and F16 through candle.
    for matrix_type in ("Q4_0", "Q5_0", "Q5_1", "F16"):
        write_fixture(args.out / f"llama-{matrix_type.lower()}.gguf", "llama",
                      f"bulwark-fixture-llama-{matrix_type.lower()}", 1, freq_base=10000.0,
                      vocab_size_key=True, matrix_type=matrix_type, **common)
    spm_tokenizer, spm_vocab = spm_tokenizer_fields(args.vocabs)
    write_fixture(args.out / "llama-spm.gguf", "llama", "bulwark-fixture-llama-spm", 5,
                  freq_base=10000.0, vocab_size_key=True, tokenizer=spm_tokenizer,
                  vocab=spm_vocab)
    print(args.out)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Write a GGUF model out again as a Hugging Face directory, the way such models are published.

  config.json                     LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM
  model.safetensors               or model-0000N-of-0000M.safetensors with
  model.safetensors.index.json    its weight_map (--shards N)
  tokenizer.json                  byte-level BPE: built with the `tokenizers` package from the
                                  GGUF's vocabulary, merges and control tokens; SentencePiece:
                                  written as transformers' LlamaConverter does (merges from
                                  the scores, byte fallback)
  tokenizer_config.json           bos/eos tokens, add_bos_token, chat_template
  generation_config.json          bos/eos ids

Weights are the GGUF's dequantized by gguf-py (exact in float32 for Q4_1 and Q8_0 blocks), so a
directory written in F32 holds the very values Bulwark's f32 path computes with from the GGUF:
both must give the same tokens. Llama's Q and K rows are put back in Hugging Face's order
(the inverse of llama.cpp's converter's `permute`); Qwen's were never permuted.

`--round F16|BF16` rounds every weight to that type first (and `--dtype F32` then stores the
rounded values exactly): a bf16 or f16 directory must read as the f32 directory of its values.

A GGUF with Llama 3's rope_freqs.weight needs `--llama3-rope FACTOR,LOW,HIGH,ORIGINAL_CONTEXT`:
config.json gets that rope_scaling, checked to give the GGUF's factors, and the loader must
compute them back.

Usage: make_hf_fixture.py SRC.gguf OUT_DIR [--shards N] [--dtype F32|F16|BF16] [--round F16|BF16]
       [--llama3-rope FACTOR,LOW,HIGH,ORIGINAL_CONTEXT]
Prints OUT_DIR. Needs numpy, gguf, safetensors and tokenizers (tests/python/requirements.txt).
"""
import argparse
import json
import math
import pathlib
import shutil

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# llama.cpp's token types: control and user-defined tokens are the added (special) ones.
CONTROL, USER_DEFINED = 3, 4

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# GGUF tensor names within a block → Hugging Face names.
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_name(name):
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{LAYER_NAMES[rest]}"


def unpermute(w, heads):
    """Inverse of convert_hf_to_gguf's permute: GGUF's adjacent rotary pairs back to halves."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def weights(reader, arch, dtype, round_to=None):
    heads = field(reader, f"{arch}.attention.head_count")
    kv_heads = field(reader, f"{arch}.attention.head_count_kv", heads)
    out = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # config.json's rope_scaling says it instead
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if arch == "llama" and t.name.endswith("attn_q.weight"):
            w = unpermute(w, heads)
        elif arch == "llama" and t.name.endswith("attn_k.weight"):
            w = unpermute(w, kv_heads)
        if round_to:
            w = from_dtype(to_dtype(w, round_to), round_to)
        out[hf_name(t.name)] = to_dtype(w, dtype)
    return out


def to_dtype(w, dtype):
    if dtype == "F32":
        return np.ascontiguousarray(w)
    if dtype == "F16":
        return np.ascontiguousarray(w.astype(np.float16))
    # bfloat16, rounded to nearest even, stored as its 16 raw bits (numpy has no bf16).
    bits = w.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.ascontiguousarray(rounded.astype(np.uint16))


def from_dtype(w, dtype):
    if dtype == "F16":
        return w.astype(np.float32)
    return (w.astype(np.uint32) << 16).view(np.float32)


def save_weights(tensors, out, shards, dtype):
    names = sorted(tensors)
    if dtype == "BF16":
        # safetensors' numpy API has no bfloat16: write the header ourselves.
        write = write_bf16
    else:
        def write(part, path):
            save_file(part, str(path), metadata={"format": "pt"})
    if shards <= 1:
        write({n: tensors[n] for n in names}, out / "model.safetensors")
        return
    chunks = np.array_split(np.array(names, dtype=object), shards)
    weight_map = {}
    for i, chunk in enumerate(chunks, 1):
        file = f"model-{i:05d}-of-{shards:05d}.safetensors"
        write({n: tensors[n] for n in chunk}, out / file)
        weight_map.update({n: file for n in chunk})
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def write_bf16(part, path):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in part.items():
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for t in part.values():
            f.write(t.astype("<u2").tobytes())


def sentencepiece_tokenizer_json(reader):
    """tokenizer.json for a SentencePiece GGUF tokenizer, as transformers' LlamaConverter writes
    one: a BPE model with byte fallback whose merges are listed from the pieces' scores
    (SentencePieceExtractor), a normalizer that prepends U+2581 and replaces spaces with it."""
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    scores = field(reader, "tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: m[2], reverse=True)
    unk = tokens[field(reader, "tokenizer.ggml.unknown_token_id", 0)]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (CONTROL, 2)]
    mark = "\u2581"
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": mark},
            {"type": "Replace", "pattern": {"String": " "}, "content": mark}]},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": mark}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                  "ignore_merges": False, "vocab": vocab, "merges": [[a, b] for a, b, _ in merges]},
    }
    return tok, tokens


def tokenizer_json(reader):
    """tokenizer.json for a byte-level BPE GGUF tokenizer with the `smollm` pre-tokenizer."""
    assert field(reader, "tokenizer.ggml.model") == "gpt2", "byte-level BPE tokenizers only"
    pre = field(reader, "tokenizer.ggml.pre", "default")
    assert pre == "smollm", f"pre-tokenizer {pre!r}: only smollm is written"
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok, tokens


def config_json(reader, arch, tied):
    k = lambda key, default=None: field(reader, f"{arch}.{key}", default)  # noqa: E731
    heads = k("attention.head_count")
    hidden = k("embedding_length")
    cfg = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": k("feed_forward_length"),
        "num_hidden_layers": k("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": k("attention.head_count_kv", heads),
        "head_dim": k("attention.key_length", hidden // heads),
        "rms_norm_eps": float(np.float32(k("attention.layer_norm_rms_epsilon"))),
        "rope_theta": k("rope.freq_base", 10000.0),
        "max_position_embeddings": k("context_length"),
        "vocab_size": k("vocab_size") or len(field(reader, "tokenizer.ggml.tokens")),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if arch == "llama":
        cfg["attention_bias"] = False
    return cfg


def llama3_rope_scaling(spec, config, stored):
    """config.json's rope_scaling for Llama 3.1+, checked to give the GGUF's rope_freqs.weight
    by the converter's formula (conversion/llama.py)."""
    factor, low, high, original = (float(x) for x in spec.split(","))
    dim = config["head_dim"]
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * config["rope_theta"] ** (i / dim)
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    assert np.array_equal(np.float32(factors), stored.astype(np.float32)), "not the GGUF's factors"
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": int(original)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=pathlib.Path)
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--dtype", choices=["F32", "F16", "BF16"], default="F32")
    p.add_argument("--round", choices=["F16", "BF16"])
    p.add_argument("--llama3-rope", metavar="FACTOR,LOW,HIGH,ORIGINAL_CONTEXT",
                   help="the rope_scaling that gave the GGUF's rope_freqs.weight (checked)")
    args = p.parse_args()
    reader = GGUFReader(args.src)
    arch = field(reader, "general.architecture")
    assert arch in ARCHITECTURES, f"architecture {arch!r}"
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    assert (rope_freqs is None) == (args.llama3_rope is None), "rope_freqs.weight needs --llama3-rope"
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    tensors = weights(reader, arch, args.dtype, args.round)
    tied = "lm_head.weight" not in tensors
    save_weights(tensors, args.out, args.shards, args.dtype)
    if field(reader, "tokenizer.ggml.model") == "llama":
        tok, tokens = sentencepiece_tokenizer_json(reader)
        (args.out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    else:
        tok, tokens = tokenizer_json(reader)
        tok.save(str(args.out / "tokenizer.json"))
    bos, eos = field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")
    config = config_json(reader, arch, tied)
    if rope_freqs is not None:
        config["rope_scaling"] = llama3_rope_scaling(args.llama3_rope, config, np.asarray(rope_freqs.data))
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    (args.out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token",
                                    field(reader, "tokenizer.ggml.model") == "llama")),
        "chat_template": field(reader, "tokenizer.chat_template"),
        "model_max_length": field(reader, f"{arch}.context_length"),
    }, indent=2))
    (args.out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}))
    print(args.out)


if __name__ == "__main__":
    main()

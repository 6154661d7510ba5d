#!/usr/bin/env python3
"""Write the seed of the `hf_directory` fuzz target: a valid Hugging Face directory of a tiny
Llama (hidden 8, one layer, 2 query heads and 1 key/value head of 4, feed-forward 8, 16 tokens)
as the target reads its input: config.json, tokenizer_config.json, generation_config.json,
model.safetensors and tokenizer.json, separated by the line `--8<--`.

Usage: make_hf_seed.py OUT_FILE   (needs numpy and safetensors: tests/python/requirements.txt)
"""
import json
import sys

import numpy as np
from safetensors.numpy import save

H, FFN, VOCAB, HEADS, KV, HD = 8, 8, 16, 2, 1, 4
SEP = b"\n--8<--\n"

config = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": H, "intermediate_size": FFN,
    "num_hidden_layers": 1, "num_attention_heads": HEADS, "num_key_value_heads": KV,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
    "vocab_size": VOCAB, "tie_word_embeddings": True, "hidden_act": "silu",
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
}
shapes = {
    "model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,),
    "model.layers.0.input_layernorm.weight": (H,),
    "model.layers.0.post_attention_layernorm.weight": (H,),
    "model.layers.0.self_attn.q_proj.weight": (HEADS * HD, H),
    "model.layers.0.self_attn.k_proj.weight": (KV * HD, H),
    "model.layers.0.self_attn.v_proj.weight": (KV * HD, H),
    "model.layers.0.self_attn.o_proj.weight": (H, HEADS * HD),
    "model.layers.0.mlp.gate_proj.weight": (FFN, H), "model.layers.0.mlp.up_proj.weight": (FFN, H),
    "model.layers.0.mlp.down_proj.weight": (H, FFN),
}
tensors = {n: np.arange(np.prod(s), dtype=np.float32).reshape(s) / 10 for n, s in shapes.items()}
tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].astype(np.float16)
tokens = ["<s>", "</s>"] + [chr(ord("a") + i) for i in range(VOCAB - 3)]
tokenizer = {
    "version": "1.0", "added_tokens": [
        {"id": 0, "content": "<s>", "special": True, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False},
        {"id": 1, "content": "</s>", "special": True, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False}],
    "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                                          "trim_offsets": True, "use_regex": True},
    "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                                        "trim_offsets": True, "use_regex": True},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
              "vocab": {t: i for i, t in enumerate(tokens)}, "merges": ["a b"]},
}
tokenizer["model"]["vocab"]["ab"] = VOCAB - 1
tokenizer_config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True,
                    "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
parts = [json.dumps(config).encode(), json.dumps(tokenizer_config).encode(),
         json.dumps({"eos_token_id": [1]}).encode(), save(tensors, metadata={"format": "pt"}),
         json.dumps(tokenizer).encode()]
open(sys.argv[1], "wb").write(SEP.join(parts))

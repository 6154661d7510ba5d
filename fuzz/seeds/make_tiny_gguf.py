#!/usr/bin/env python3
"""Build the fuzz seeds' tiny GGUF: the demo model's metadata (every key, the chat template
included) with a small vocabulary and no tensors, so that the committed corpus stays small.

    fuzz/seeds/make_tiny_gguf.py .demo/model/SmolLM2-135M-Instruct.Q4_1.gguf fuzz/seeds/tiny.gguf

The vocabulary keeps the control and user-defined tokens, the 256 byte-level symbols, and the
first merges (in the model's order) whose parts are already kept, so the BPE model builds and
encodes any text. Pure Python, no dependencies: GGUF v3, little-endian.
"""
import struct
import sys

# GGUF value types.
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
          BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}
MAX_MERGES = 400


class Reader:
    def __init__(self, f):
        self.f = f

    def unpack(self, fmt):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.f.read(size))[0]

    def string(self):
        n = self.unpack("<Q")
        return self.f.read(n).decode("utf-8", "replace")

    def value(self, t):
        if t in SCALAR:
            return self.unpack(SCALAR[t])
        if t == STRING:
            return self.string()
        if t == ARRAY:
            et = self.unpack("<I")
            n = self.unpack("<Q")
            return (et, [self.value(et) for _ in range(n)])
        raise ValueError(f"value type {t}")


def read_metadata(path):
    with open(path, "rb") as f:
        r = Reader(f)
        assert f.read(4) == b"GGUF", "not a GGUF file"
        version = r.unpack("<I")
        assert version == 3, f"GGUF version {version}"
        r.unpack("<Q")  # tensor count: the tensors are not kept
        n_kv = r.unpack("<Q")
        kv = []
        for _ in range(n_kv):
            key = r.string()
            t = r.unpack("<I")
            kv.append((key, t, r.value(t)))
        return kv


def put_string(out, s):
    b = s.encode("utf-8")
    out += struct.pack("<Q", len(b)) + b


def put_value(out, t, v):
    if t in SCALAR:
        out += struct.pack(SCALAR[t], v)
    elif t == STRING:
        put_string(out, v)
    elif t == ARRAY:
        et, items = v
        out += struct.pack("<IQ", et, len(items))
        for item in items:
            put_value(out, et, item)
    else:
        raise ValueError(f"value type {t}")


def byte_level_alphabet():
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, n = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return chars


def shrink(kv):
    d = {k: v for k, _, v in kv}
    tokens = d["tokenizer.ggml.tokens"][1]
    types = d["tokenizer.ggml.token_type"][1]
    merges = d["tokenizer.ggml.merges"][1]
    keep = [t for t, ty in zip(tokens, types) if ty in (3, 4)]
    kept = set(keep)
    for c in byte_level_alphabet():
        if c not in kept:
            keep.append(c)
            kept.add(c)
    new_merges = []
    for m in merges:
        a, b = m.split(" ", 1)
        if a in kept and b in kept:
            new_merges.append(m)
            if a + b not in kept:
                keep.append(a + b)
                kept.add(a + b)
            if len(new_merges) >= MAX_MERGES:
                break
    old_type = dict(zip(tokens, types))
    new_types = [old_type.get(t, 1) for t in keep]
    index = {t: i for i, t in enumerate(keep)}

    def remap(key):
        old = d.get(key)
        return None if old is None else index.get(tokens[old], 0)

    out = []
    for key, t, v in kv:
        if key == "tokenizer.ggml.tokens":
            v = (STRING, keep)
        elif key == "tokenizer.ggml.token_type":
            v = (I32, new_types)
        elif key == "tokenizer.ggml.merges":
            v = (STRING, new_merges)
        elif key.endswith("_token_id") and key.startswith("tokenizer.ggml."):
            v = remap(key)
        elif key == "llama.vocab_size":
            v = len(keep)
        out.append((key, t, v))
    return out


def write(path, kv):
    out = bytearray(b"GGUF")
    out += struct.pack("<IQQ", 3, 0, len(kv))
    for key, t, v in kv:
        put_string(out, key)
        out += struct.pack("<I", t)
        put_value(out, t, v)
    # Tensor data starts at the next 32-byte boundary; with no tensors, pad to it anyway.
    out += b"\0" * (-len(out) % 32)
    with open(path, "wb") as f:
        f.write(out)


if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    kv = read_metadata(src)
    if "--keys" in sys.argv:
        for k, t, v in kv:
            s = repr(v if t != ARRAY else (v[0], len(v[1]), v[1][:5]))
            print(k, t, s[:200])
        sys.exit(0)
    tiny = shrink(kv)
    write(dst, tiny)
    print(f"{dst}: {len(tiny)} keys", file=sys.stderr)

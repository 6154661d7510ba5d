#!/usr/bin/env python3
"""An exact reference forward pass: float64 numpy over a GGUF's dequantized tensors.

For the `llama`, `qwen2` and `qwen3` architectures as llama.cpp computes them mathematically,
with no rounding but float64's: token embedding lookup; per layer RMS norm times attn_norm,
Q/K/V projections (with Qwen2's biases), Qwen3's per-head Q/K norms, rotary embeddings
(adjacent pairs for Llama, halves for Qwen; Llama 3.1's frequency factors), causal
grouped-query attention, output projection, residual; RMS norm times ffn_norm, SwiGLU, down projection,
residual; final RMS norm times output_norm, logits with `output.weight` or the tied embedding.

The only approximation is the file itself: each weight is dequantized once (gguf-py, float32,
which holds every dequantized value of the GGML block formats exactly up to the last product's
rounding) and then widened to float64. Activations are never quantized, so this is the smooth
function that both llama.cpp (8-bit activations) and Bulwark (8-bit activations on the
quantized path, f32 on `weights = "f32"`) approximate.

Usage: f64_forward.py MODEL.gguf ID [ID ...]
prints the top-5 next-token log-probabilities after the prompt IDS, one `id logprob token` a line.
Importable: `Reference(path).logprobs(ids)` returns the float64 log-softmax of the last position.
"""
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def _scalar(reader, key):
    field = reader.fields[key]
    return field.parts[field.data[0]][0].item()


ARCHITECTURES = ("llama", "qwen2", "qwen3")


class Reference:
    def __init__(self, path):
        self.reader = GGUFReader(path)
        arch = bytes(self.reader.fields["general.architecture"].parts[-1]).decode()
        if arch not in ARCHITECTURES:
            raise SystemExit(f"f64_forward: architecture {arch!r}; implemented: {ARCHITECTURES}")
        self.arch = arch
        g = lambda k: _scalar(self.reader, f"{arch}.{k}")
        self.n_layer = int(g("block_count"))
        self.n_embd = int(g("embedding_length"))
        self.n_head = int(g("attention.head_count"))
        self.n_kv = int(g("attention.head_count_kv"))
        self.eps = float(g("attention.layer_norm_rms_epsilon"))
        self.rope_base = float(g("rope.freq_base"))
        key_length = f"{arch}.attention.key_length"
        self.head_dim = (int(_scalar(self.reader, key_length)) if key_length in self.reader.fields
                         else self.n_embd // self.n_head)
        for key in ("rope.scaling.type", "attention.sliding_window"):
            if f"{arch}.{key}" in self.reader.fields:
                raise SystemExit(f"f64_forward: {arch}.{key} is not implemented")
        self._cache = {}
        # Llama 3.1+ rope scaling: each pair's frequency divided by its factor.
        self.rope_factors = self.w("rope_freqs.weight") if self.has("rope_freqs.weight") else None

    def _tensors(self):
        return {t.name: t for t in self.reader.tensors}

    def w(self, name):
        """The tensor `name`, dequantized, as float64; 2-D weights come out (n_out, n_in)."""
        if name not in self._cache:
            t = self._tensors()[name]
            a = dequantize(t.data, t.tensor_type)
            # gguf-py lists shapes in GGML's ne order (fastest first); numpy's is the reverse.
            shape = tuple(int(n) for n in reversed(t.shape))
            self._cache[name] = np.asarray(a, dtype=np.float64).reshape(shape)
        return self._cache[name]

    def has(self, name):
        return name in self._tensors()

    def rms_norm(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def rope(self, x, positions):
        """x: (n_tokens, n_heads, head_dim). Llama (in GGUF) rotates adjacent pairs (2i, 2i+1),
        Qwen the halves (i, i + d/2), as llama.cpp's "normal" and "neox" ropes do."""
        d = self.head_dim
        inv_freq = self.rope_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        if self.rope_factors is not None:
            inv_freq = inv_freq / self.rope_factors
        theta = positions[:, None].astype(np.float64) * inv_freq[None, :]  # (n_tokens, d/2)
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        if self.arch == "llama":
            i0, i1 = slice(0, d, 2), slice(1, d, 2)
        else:
            i0, i1 = slice(0, d // 2), slice(d // 2, d)
        x0, x1 = x[..., i0], x[..., i1]
        out = np.empty_like(x)
        out[..., i0] = x0 * cos - x1 * sin
        out[..., i1] = x0 * sin + x1 * cos
        return out

    def project(self, h, p, name):
        """`h @ W.T`, plus the bias when the layer has one (Qwen2's Q, K and V)."""
        y = h @ self.w(p + name + ".weight").T
        return y + self.w(p + name + ".bias") if self.has(p + name + ".bias") else y

    def hidden(self, ids):
        """The final-normed hidden states, (n_tokens, n_embd)."""
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        pos = np.arange(n)
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv
        group = nh // nkv
        x = self.w("token_embd.weight")[ids]
        mask = np.triu(np.full((n, n), -np.inf), k=1)
        for il in range(self.n_layer):
            p = f"blk.{il}."
            h = self.rms_norm(x, self.w(p + "attn_norm.weight"))
            q = self.project(h, p, "attn_q").reshape(n, nh, hd)
            k = self.project(h, p, "attn_k").reshape(n, nkv, hd)
            v = self.project(h, p, "attn_v").reshape(n, nkv, hd)
            if self.has(p + "attn_q_norm.weight"):  # Qwen3: each head normed before rotating
                q = self.rms_norm(q, self.w(p + "attn_q_norm.weight"))
                k = self.rms_norm(k, self.w(p + "attn_k_norm.weight"))
            q, k = self.rope(q, pos), self.rope(k, pos)
            att = np.empty((n, nh, hd))
            for head in range(nh):
                kv = head // group
                s = (q[:, head, :] @ k[:, kv, :].T) / np.sqrt(hd) + mask
                s = np.exp(s - s.max(axis=-1, keepdims=True))
                s /= s.sum(axis=-1, keepdims=True)
                att[:, head, :] = s @ v[:, kv, :]
            x = x + att.reshape(n, nh * hd) @ self.w(p + "attn_output.weight").T
            h = self.rms_norm(x, self.w(p + "ffn_norm.weight"))
            gate = h @ self.w(p + "ffn_gate.weight").T
            up = h @ self.w(p + "ffn_up.weight").T
            x = x + (gate / (1.0 + np.exp(-gate)) * up) @ self.w(p + "ffn_down.weight").T
        return self.rms_norm(x, self.w("output_norm.weight"))

    def logprobs(self, ids):
        """float64 log-softmax over the vocabulary after the last token of `ids`."""
        h = self.hidden(ids)[-1]
        head = self.w("output.weight" if self.has("output.weight") else "token_embd.weight")
        logits = head @ h
        m = logits.max()
        return logits - (m + np.log(np.exp(logits - m).sum()))

    def token_text(self, token_id):
        f = self.reader.fields["tokenizer.ggml.tokens"]
        return bytes(f.parts[f.data[token_id]]).decode("utf-8", "replace")


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__.split("Usage: ")[1].split("\n")[0])
    ref = Reference(sys.argv[1])
    lp = ref.logprobs([int(a) for a in sys.argv[2:]])
    for i in np.argsort(-lp)[:5]:
        print(f"{i}\t{lp[i]:.6f}\t{ref.token_text(int(i))!r}")


if __name__ == "__main__":
    main()

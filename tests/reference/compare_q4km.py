#!/usr/bin/env python3
"""Which side is wrong on Q4_K_M (issue 11)? First-token log-probabilities against an exact one.

For each model file (the Q4_1 demo model, as a control, and the same model requantized to
Q4_K_M by llama-quantize) and each prompt (the five chat cases of
engine/tests/data/llamacpp-reference.json, by their prompt ids, and "Why do cats purr?"), the
first-token log-probabilities of the f64 reference's top 5 tokens come from:

  f64               tests/reference/f64_forward.py: float64 over the dequantized tensors
  llama.cpp         llama-server, -fa off, one slot, two threads (as the reference data)
  llama.cpp no-repack  the same with --no-repack: on x86 llama.cpp repacks Q4_K weights
                    (q4_K_8x8 kernels) by default, another rounding order; Q4_1 is not repacked
  bulwark f32       Bulwark, `weights = "f32"`: dequantized weights, f32 activations
  bulwark quantized Bulwark, `weights = "quantized"`: 8-bit activations, as llama.cpp

and each source's |logprob - f64| is summarised as mean and worst per model file.

Usage: compare_q4km.py [LLAMA_BIN_DIR]
LLAMA_BIN_DIR defaults to what bench/build-llama-server.sh prints. Bulwark is
target/release/bulwark (not rebuilt here). Writes /tmp/q4km-results.json (every number) and
/tmp/q4km-results.md (the table); the Q4_K_M file goes to ~/.cache/bulwark/q4km/.
"""
import gc
import hashlib
import json
import pathlib
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from gguf import GGUFReader

import f64_forward  # tests/reference/f64_forward.py
import llama_server  # tests/reference/llama_server.py

ROOT = pathlib.Path(__file__).resolve().parents[2]
BULWARK = ROOT / "target/release/bulwark"
Q4KM = pathlib.Path.home() / ".cache/bulwark/q4km/SmolLM2-135M-Instruct.Q4_K_M.gguf"
LLAMA_PORT = 18804
BULWARK_PORT = 18812  # its metrics listener takes the next port
TOP = 5  # tokens compared per prompt: the f64 reference's top 5
ASK = 20  # top log-probabilities asked of each server, so that f64's top 5 are among them
CATS = [{"role": "user", "content": "Why do cats purr?"}]
OUT_JSON = pathlib.Path("/tmp/q4km-results.json")
OUT_MD = pathlib.Path("/tmp/q4km-results.md")
SOURCES = ["llama.cpp", "llama.cpp no-repack", "bulwark f32", "bulwark quantized"]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gpt2_byte_decoder():
    """GPT-2's byte-level BPE alphabet, inverted: vocabulary character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(model):
    """id -> the bytes Bulwark reports for it (normal tokens decoded from GPT-2's alphabet)."""
    reader = GGUFReader(model)
    tokens, types = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.token_type"]
    dec = gpt2_byte_decoder()
    out = []
    for i, part in enumerate(tokens.data):
        text = bytes(tokens.parts[part]).decode("utf-8")
        normal = int(types.parts[types.data[i]][0]) == 1
        out.append(bytes(dec[c] for c in text) if normal and all(c in dec for c in text)
                   else text.encode("utf-8"))
    return out


def prompts(bin_dir, model):
    """The reference chat cases and the cats prompt, each with messages and prompt ids.

    The cats prompt is rendered with the model's template and tokenized by llama-server; the
    same route is checked on the reference cases, whose ids are already known."""
    cases = json.loads((ROOT / "engine/tests/data/llamacpp-reference.json").read_text())["chat"]
    out = [{"name": c["messages"][-1]["content"], "messages": c["messages"],
            "prompt_ids": c["prompt_ids"]} for c in cases]
    with llama_server.running(bin_dir, model, LLAMA_PORT, "-t", "2", "-np", "1", "-c", "2048",
                              "-fa", "off") as server:
        def ids(messages):
            text = server.post("/apply-template", {"messages": messages})["prompt"]
            return server.post("/tokenize", {"content": text, "add_special": False,
                                             "parse_special": True})["tokens"]
        for c in out:
            if ids(c["messages"]) != c["prompt_ids"]:
                raise SystemExit(f"llama-server tokenizes {c['name']!r} otherwise than the reference")
        out.append({"name": CATS[-1]["content"], "messages": CATS, "prompt_ids": ids(CATS)})
    return out


def llama_cpp(bin_dir, model, cases, vocab_bytes, *extra):
    """llama-server's top-ASK first-token log-probabilities per case, keyed by token id.

    llama-server reports no probabilities for a token that leaves the text in the middle of a
    UTF-8 character (a byte token: the Japanese case's greedy first token is one). The reported
    log-probabilities are the softmax of the raw logits, before any sampler; so such a case is
    asked again with every token that is not whole UTF-8 on its own banned by `logit_bias`,
    which changes the sampled token only."""
    def partial(b):
        try:
            b.decode("utf-8")
            return False
        except UnicodeDecodeError:
            return True
    ban = [[i, False] for i, b in enumerate(vocab_bytes) if partial(b)]
    with llama_server.running(bin_dir, model, LLAMA_PORT, "-t", "2", "-np", "1", "-c", "2048",
                              "-fa", "off", *extra) as server:
        res = []
        for c in cases:
            body = {"prompt": c["prompt_ids"], "n_predict": 1, "temperature": 0, "n_probs": ASK,
                    "cache_prompt": False}
            r = server.post("/completion", body)
            if not r.get("completion_probabilities"):
                r = server.post("/completion", {**body, "logit_bias": ban})
            top = r["completion_probabilities"][0]["top_logprobs"]
            res.append({t["id"]: t["logprob"] for t in top})
        return res


def bulwark(model, weights, cases, vocab_bytes):
    """Bulwark's top-ASK first-token log-probabilities per case, keyed by token id."""
    by_bytes = {b: i for i, b in enumerate(vocab_bytes)}
    with tempfile.TemporaryDirectory(prefix="bulwark-q4km-") as d:
        d = pathlib.Path(d)
        init = subprocess.run([str(BULWARK), "init", "--dir", str(d / "srv"), "--model", str(model),
                               "--listen", f"127.0.0.1:{BULWARK_PORT}", "--name", "m"],
                              check=True, capture_output=True, text=True).stdout
        key = re.search(r"^api key: (\S+)$", init, re.M).group(1)
        cfg = d / "srv/bulwark.toml"
        toml = cfg.read_text().replace('name = "m"', f'name = "m"\nweights = "{weights}"')
        cfg.write_text(toml + f'\n[limits]\nrate_limit_per_minute = 0\n\n'
                              f'[metrics]\nlisten = "127.0.0.1:{BULWARK_PORT + 1}"\n')
        tls = ssl.create_default_context(cafile=str(d / "srv/cert.pem"))
        log = open(d / "serve.log", "w")
        proc = subprocess.Popen([str(BULWARK), "serve", "--config", str(cfg)],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            def post(body):
                req = urllib.request.Request(
                    f"https://127.0.0.1:{BULWARK_PORT}/v1/chat/completions",
                    data=json.dumps(body).encode(),
                    headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
                with urllib.request.urlopen(req, timeout=300, context=tls) as r:
                    return json.load(r)
            for _ in range(600):
                if proc.poll() is not None:
                    raise SystemExit("bulwark exited during start-up:\n" + (d / "serve.log").read_text())
                if "serving" in (d / "serve.log").read_text():
                    break
                time.sleep(0.2)
            res = []
            for c in cases:
                r = post({"model": "m", "messages": c["messages"], "max_tokens": 1, "temperature": 0,
                          "logprobs": True, "top_logprobs": ASK})
                if r["usage"]["prompt_tokens"] != len(c["prompt_ids"]):
                    raise SystemExit(f"bulwark's prompt for {c['name']!r} has "
                                     f"{r['usage']['prompt_tokens']} tokens, not {len(c['prompt_ids'])}")
                top = r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
                res.append({by_bytes[bytes(t["bytes"])]: t["logprob"] for t in top})
            return res
        finally:
            proc.terminate()
            proc.wait()
            log.close()


def make_q4km(bin_dir, q4_1):
    if not Q4KM.exists():
        Q4KM.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(q4_1), str(Q4KM),
                        "Q4_K_M"], check=True, capture_output=True)
    # Bulwark drops to an unprivileged user: the model must be readable by it.
    Q4KM.chmod(0o644)
    return Q4KM


def main():
    bin_dir = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else subprocess.run(
        [str(ROOT / "bench/build-llama-server.sh")], check=True, capture_output=True,
        text=True).stdout.strip().splitlines()[-1])
    q4_1 = ROOT / subprocess.run([str(ROOT / "scripts/fetch-model.sh")], check=True, cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
    models = {"Q4_1": q4_1, "Q4_K_M": make_q4km(bin_dir, q4_1)}
    cases = prompts(bin_dir, q4_1)
    vocab_bytes = token_bytes(q4_1)
    results = {"llama_bin_dir": str(bin_dir), "models": {}}
    for label, model in models.items():
        print(f"{label}: {model}", file=sys.stderr)
        ref = f64_forward.Reference(str(model))
        f64 = [ref.logprobs(c["prompt_ids"]) for c in cases]
        del ref
        gc.collect()
        got = {"llama.cpp": llama_cpp(bin_dir, model, cases, vocab_bytes),
               "llama.cpp no-repack": llama_cpp(bin_dir, model, cases, vocab_bytes, "--no-repack"),
               "bulwark f32": bulwark(model, "f32", cases, vocab_bytes),
               "bulwark quantized": bulwark(model, "quantized", cases, vocab_bytes)}
        per_case = []
        for i, c in enumerate(cases):
            rows = []
            for t in np.argsort(-f64[i])[:TOP]:
                t = int(t)
                row = {"id": t, "token": vocab_bytes[t].decode("utf-8", "backslashreplace"),
                       "f64": float(f64[i][t])}
                for s in SOURCES:
                    row[s] = got[s][i].get(t)  # None: not in that source's top ASK
                rows.append(row)
            per_case.append({"name": c["name"], "prompt_ids": c["prompt_ids"], "top": rows})
        summary = {}
        for s in SOURCES:
            d = [abs(r[s] - r["f64"]) for c in per_case for r in c["top"] if r[s] is not None]
            missing = sum(r[s] is None for c in per_case for r in c["top"])
            summary[s] = {"mean": float(np.mean(d)), "worst": float(np.max(d)), "n": len(d),
                          "missing": missing}
        results["models"][label] = {"path": str(model), "sha256": sha256(model),
                                    "summary": summary, "cases": per_case}
    OUT_JSON.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    OUT_MD.write_text(markdown(results))
    print(OUT_MD.read_text())


def nats(x):
    return f"{x:.4f}" if x >= 1e-3 else f"{x:.0e}"


def markdown(results):
    lines = ["| model file | source | mean \\|Δ\\| (nats) | worst \\|Δ\\| (nats) |", "|---|---|---|---|"]
    for label, m in results["models"].items():
        for s in SOURCES:
            v = m["summary"][s]
            miss = f" ({v['missing']} not in top {ASK})" if v["missing"] else ""
            lines.append(f"| {label} | {s} | {nats(v['mean'])} | {nats(v['worst'])}{miss} |")
    lines += ["", f"|Δ|: first-token log-probability minus the f64 reference's, over the f64 "
              f"reference's top {TOP} tokens of {len(next(iter(results['models'].values()))['cases'])} "
              "chat prompts."]
    for label, m in results["models"].items():
        cats = m["cases"][-1]
        lines += ["", f"{label}, \"{cats['name']}\":", "",
                  "| token | f64 | " + " | ".join(SOURCES) + " |", "|---|---|" + "---|" * len(SOURCES)]
        for r in cats["top"]:
            vals = " | ".join("—" if r[s] is None else f"{r[s]:.4f}" for s in SOURCES)
            lines.append(f"| {r['token']!r} | {r['f64']:.4f} | {vals} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""GPU smoke and speed check, stdlib only (the GPU host may have no network): starts a CUDA
build of Bulwark on the demo model, checks the first-token log-probabilities against the
llama.cpp reference, checks every thread's confinement, and measures aggregate streaming
throughput at 1, 4 and 16 clients.

Usage: gpu-check.py BULWARK_BIN MODEL.gguf OUT_DIR
"""
import http.client
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN, MODEL, OUT = sys.argv[1], sys.argv[2], Path(sys.argv[3])
PORT = 18443
CPU_PORT = 18444
TOL = 0.25


def main():
    d = OUT / "srv"
    out = subprocess.run([BIN, "init", "--dir", d, "--model", MODEL, "--listen", f"127.0.0.1:{PORT}", "--name", "smollm2"],
                         check=True, capture_output=True, text=True).stdout
    key = out.strip().splitlines()[-1].removeprefix("api key: ")
    cfg = d / "bulwark.toml"
    cfg.write_text(cfg.read_text().replace("[model]", "[model]\ncontext_length = 4096", 1)
                   + '\n[engine]\ndevice = "cuda:0"\nmax_batch = 64\n[sandbox]\nenforcement = "best-effort"\n[limits]\nrate_limit_per_minute = 0\n')
    # The same binary on the CPU, for a differential check.
    dc = OUT / "srv-cpu"
    out = subprocess.run([BIN, "init", "--dir", dc, "--model", MODEL, "--listen", f"127.0.0.1:{CPU_PORT}", "--name", "smollm2"],
                         check=True, capture_output=True, text=True).stdout
    cpu_key = out.strip().splitlines()[-1].removeprefix("api key: ")
    (dc / "bulwark.toml").write_text((dc / "bulwark.toml").read_text() + '\n[metrics]\nlisten = "127.0.0.1:19465"\n[engine]\nthreads = 8\n')
    cpu_proc = subprocess.Popen([BIN, "serve", "--config", dc / "bulwark.toml"], stdout=open(OUT / "cpu.log", "w"), stderr=subprocess.STDOUT)
    cpu_ctx = ssl.create_default_context(cafile=str(dc / "cert.pem"))
    log = open(OUT / "server.log", "w")
    proc = subprocess.Popen([BIN, "serve", "--config", cfg], stdout=log, stderr=subprocess.STDOUT)
    ctx = ssl.create_default_context(cafile=str(d / "cert.pem"))
    results = {}
    try:
        def wait_ready(port, context, k):
            for _ in range(300):
                if proc.poll() is not None:
                    raise SystemExit("server exited: " + (OUT / "server.log").read_text())
                try:
                    c = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
                    c.request("GET", "/v1/models", headers={"authorization": f"Bearer {k}"})
                    if c.getresponse().status == 200:
                        return
                except OSError:
                    time.sleep(0.2)
            raise SystemExit(f"port {port} never became ready")

        wait_ready(PORT, ctx, key)
        wait_ready(CPU_PORT, cpu_ctx, cpu_key)

        def post(body, port=PORT):
            c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx if port == PORT else cpu_ctx, timeout=300)
            k = key if port == PORT else cpu_key
            c.request("POST", "/v1/chat/completions", body=json.dumps(body),
                      headers={"authorization": f"Bearer {k}", "content-type": "application/json"})
            return c.getresponse()

        # 1. Agreement at the first generated position: with llama.cpp (top-1 log-probability)
        # and, token by token, with the same binary on the CPU.
        ref = json.loads((ROOT / "engine/tests/data/llamacpp-reference.json").read_text())
        worst, worst_cpu, cases = 0.0, 0.0, []
        for case in ref["chat"]:
            body = {"model": "smollm2", "messages": case["messages"], "max_tokens": 1, "temperature": 0,
                    "logprobs": True, "top_logprobs": 5}
            r = json.loads(post(body).read())
            c = json.loads(post(body, port=CPU_PORT).read())
            assert r["usage"]["prompt_tokens"] == len(case["prompt_ids"]), r["usage"]
            # Keyed by raw bytes: several byte tokens share the text U+FFFD.
            tops = {bytes(t["bytes"]).hex(): t["logprob"] for t in r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
            cpu = {bytes(t["bytes"]).hex(): t["logprob"] for t in c["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
            d_ref = abs(max(tops.values()) - case["top"][0]["logprob"])
            d_cpu = max(abs(tops[t] - cpu[t]) for t in tops if t in cpu)
            worst, worst_cpu = max(worst, d_ref), max(worst_cpu, d_cpu)
            cases.append({"gpu": tops, "cpu": cpu, "llamacpp_top1": case["top"][0]["logprob"]})
        results["first_token_cases"] = cases
        results["llamacpp_top1_logprob_max_diff"] = worst
        results["cpu_vs_gpu_logprob_max_diff"] = worst_cpu
        results["within_tolerance"] = worst <= TOL and worst_cpu <= TOL
        greedy = json.loads(post({"model": "smollm2", "messages": ref["chat"][0]["messages"], "max_tokens": 24,
                                  "temperature": 0}).read())
        results["france_answer"] = greedy["choices"][0]["message"]["content"]

        # 2. Confinement status of every thread.
        threads = {}
        for t in Path(f"/proc/{proc.pid}/task").iterdir():
            s = dict(l.split(":", 1) for l in (t / "status").read_text().splitlines() if ":" in l)
            threads[t.name] = {k: s[k].strip() for k in ("Name", "Seccomp", "NoNewPrivs", "CapEff", "CapBnd", "Uid")}
        results["threads"] = threads

        # 3. Throughput: streaming chat, 128 tokens, N clients.
        def client(n_req, lat, toks):
            for _ in range(n_req):
                t0 = time.time()
                r = post({"model": "smollm2", "max_tokens": 128, "temperature": 0, "stream": True,
                          "stream_options": {"include_usage": True},
                          "messages": [{"role": "user", "content": "Write a short story about a robot learning to paint."}]})
                n = 0
                for line in r:
                    if line.startswith(b"data: {") and b'"usage"' in line:
                        n = json.loads(line[6:])["usage"]["completion_tokens"]
                lat.append(time.time() - t0)
                toks.append(n)

        for conc in (1, 4, 16, 64):
            lat, toks = [], []
            t0 = time.time()
            ths = [threading.Thread(target=client, args=(2, lat, toks)) for _ in range(conc)]
            for t in ths:
                t.start()
            for t in ths:
                t.join()
            wall = time.time() - t0
            lat.sort()
            results[f"c{conc}"] = {"tok_per_s": sum(toks) / wall, "p50_latency_s": lat[len(lat) // 2], "requests": len(lat)}
    finally:
        cpu_proc.terminate()
        proc.terminate()
        proc.wait(30)
        results["exit_code"] = proc.returncode
        (OUT / "gpu-results.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

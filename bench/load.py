#!/usr/bin/env python3
"""Load client for OpenAI-compatible servers: N concurrent streaming chat clients.

Measures aggregate generated tokens/s, p50/p95 request latency and p50/p95 time to first token.
Tokens are counted from `usage` (stream_options.include_usage) when the server sends it, else
one per content chunk. Loopback only; no redirects; bounded by --requests and --timeout.

With --prompt-words N it measures prompt processing instead: one client sends long prompts
(N words after the chat template's system prompt, different from their first word on, so a
prompt cache can serve no more than the system prompt) asking for one token, and reports
prompt tokens (from `usage`) per second of request time.
"""
import argparse
import asyncio
import json
import random
import statistics
import time

import httpx

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a rainbow forms.",
    "List five tips for staying productive while working from home.",
    "Describe the water cycle to a ten-year-old.",
]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


async def one(client, args, i, results):
    progress = {"answered": False}
    try:
        await one_attempt(client, args, i, results, progress)
    except httpx.RemoteProtocolError:
        # A keep-alive connection the server closed as the request went out (llama-server's
        # HTTP library closes a connection after a few requests): when nothing was answered,
        # the request is sent again on a new connection, as HTTP clients do.
        if progress["answered"]:
            raise
        await one_attempt(client, args, i, results, progress)


async def one_attempt(client, args, i, results, progress):
    body = {"model": args.model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        progress["answered"] = True
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]["completion_tokens"]
            for ch in ev.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
    results.append({"latency": time.perf_counter() - start, "ttft": ttft or float("nan"),
                    "tokens": usage if usage is not None else chunks})


WORDS = ("river stone light garden window paper music winter summer engine market forest "
         "silver animal doctor letter bridge castle planet ocean signal season number story").split()


async def prompt_pass(client, args, i, results):
    rng = random.Random(i)
    text = f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(args.prompt_words))
    body = {"model": args.model, "messages": [{"role": "user", "content": text}],
            "max_tokens": 1, "temperature": 0}
    start = time.perf_counter()
    try:
        r = await client.post("/v1/chat/completions", json=body)
    except httpx.RemoteProtocolError:  # a closed keep-alive connection, as in `one`
        start = time.perf_counter()
        r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    results.append({"latency": time.perf_counter() - start,
                    "prompt_tokens": r.json()["usage"]["prompt_tokens"]})


async def run_prompts(args):
    async with client_for(args) as client:
        await prompt_pass(client, args, 10_000, [])  # warm-up
        results = []
        for i in range(args.requests):
            await prompt_pass(client, args, i, results)
    toks = sum(r["prompt_tokens"] for r in results)
    wall = sum(r["latency"] for r in results)
    return {"requests": len(results), "prompt_tokens": toks, "wall_s": wall,
            "prompt_tok_per_s": toks / wall, "p50_latency_s": pct([r["latency"] for r in results], 50)}


def client_for(args):
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.AsyncClient(base_url=args.base_url, headers=headers, verify=args.cacert or False,
                             timeout=args.timeout, follow_redirects=False, trust_env=False,
                             limits=httpx.Limits(max_connections=args.concurrency + 2))


async def run(args):
    async with client_for(args) as client:
        await one(client, args, 0, [])  # warm-up
        results, queue = [], list(range(args.requests))
        start = time.perf_counter()

        async def worker():
            while queue:
                await one(client, args, queue.pop(), results)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
    toks = sum(r["tokens"] for r in results)
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    return {"concurrency": args.concurrency, "requests": len(results), "tokens": toks, "wall_s": wall,
            "tok_per_s": toks / wall, "p50_latency_s": pct(lat, 50), "p95_latency_s": pct(lat, 95),
            "p50_ttft_s": pct(ttft, 50), "p95_ttft_s": pct(ttft, 95)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key")
    ap.add_argument("--cacert")
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--prompt-words", type=int, help="measure prompt processing with prompts this long")
    args = ap.parse_args()
    host = httpx.URL(args.base_url).host
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("loopback only")
    assert 1 <= args.concurrency <= 256 and 1 <= args.requests <= 10000
    print(json.dumps(asyncio.run(run_prompts(args) if args.prompt_words else run(args))))


if __name__ == "__main__":
    main()

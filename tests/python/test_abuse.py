"""Regression tests for what an attacker found against a running server (issue: hardening):
anonymous HTTP/2 connections kept alive by control frames, one source holding every slot,
stalled request bodies and stalled readers holding in-flight slots, and log lines that lost
their token counts."""
import json
import socket
import ssl
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import httpx

from conftest import MODEL_NAME


def tls(srv, alpn=("h2",)):
    ctx = srv.ssl_context()
    ctx.set_alpn_protocols(list(alpn))
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    return s


def h2_client(s, window=65535, validate=True):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding="utf-8", validate_outbound_headers=validate,
        normalize_outbound_headers=validate))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    s.sendall(conn.data_to_send())
    return conn


def closed_within(s, conn, seconds, ping_every=0.3):
    """Send PINGs (never a request) until the server closes the connection; True if it did."""
    deadline = time.time() + seconds
    s.settimeout(ping_every)
    while time.time() < deadline:
        try:
            conn.ping(b"12345678")
            s.sendall(conn.data_to_send())
            data = s.recv(65536)
            if not data:
                return True
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ConnectionTerminated):
                    return True
        except h2.exceptions.ProtocolError:
            return True  # frames after the server's GOAWAY: the connection is closed
        except socket.timeout:
            continue
        except (ssl.SSLError, OSError):
            return True
    return False


def keyed_models(srv):
    return httpx.get(srv.url + "/v1/models", verify=srv.ssl_context(), timeout=10,
                     headers={"authorization": f"Bearer {srv.key}"}).status_code


def eventually_ok(srv, seconds=3):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if keyed_models(srv) == 200:
            return True
        time.sleep(0.2)
    return False


def test_anonymous_h2_ping_flood_cannot_hold_the_connection_slots(make_server):
    srv = make_server("[limits]\nidle_timeout_secs = 2\nmax_connections = 3\nmax_connections_per_source = 0\n")
    pingers = [tls(srv) for _ in range(3)]
    conns = [h2_client(s) for s in pingers]
    # Every slot is held by an anonymous pinger: a client with a key is turned away...
    assert keyed_models(srv) == 503
    # ...until the pingers are closed, though they never stop sending control frames.
    results = [None] * 3

    def ping(i):
        results[i] = closed_within(pingers[i], conns[i], 8)

    threads = [threading.Thread(target=ping, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True, True, True], "anonymous PING-only connections were kept open"
    assert eventually_ok(srv)


def test_one_source_cannot_take_every_connection(make_server):
    srv = make_server("[limits]\nmax_connections_per_source = 2\n")
    held = [tls(srv, ("http/1.1",)) for _ in range(2)]
    third = tls(srv, ("http/1.1",))
    third.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {srv.key}\r\n\r\n".encode())
    answer = third.recv(65536)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:40]
    assert b"limits.max_connections_per_source" in answer
    for s in held + [third]:
        s.close()
    time.sleep(0.2)
    assert keyed_models(srv) == 200


def test_a_stalled_body_times_out_and_holds_no_slot(make_server):
    srv = make_server("[limits]\nbody_read_timeout_secs = 2\nmax_in_flight = 1\n")
    s = tls(srv, ("http/1.1",))
    s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {srv.key}\r\n"
               "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":").encode())
    # While the upload stalls, the only in-flight slot is free for others.
    time.sleep(0.5)
    assert keyed_models(srv) == 200
    started = time.time()
    s.settimeout(10)
    answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:60]
    assert b"limits.body_read_timeout_secs" in answer
    assert time.time() - started < 5


def test_a_reader_with_a_shut_window_is_abandoned_and_logged_with_its_tokens(make_server):
    srv = make_server("[limits]\nwrite_timeout_secs = 2\nmax_in_flight = 1\n")
    s = tls(srv)
    conn = h2_client(s, window=0)  # the server may never send a byte of any stream's body
    # A counting prompt runs to max_tokens: more deltas than the server buffers for a stream.
    body = json.dumps({"model": MODEL_NAME, "stream": True, "max_tokens": 400, "temperature": 0,
                       "prompt": ", ".join(str(i) for i in range(1, 40)) + ","}).encode()
    conn.send_headers(1, [(":method", "POST"), (":path", "/v1/completions"), (":scheme", "https"),
                          (":authority", "127.0.0.1"), ("authorization", f"Bearer {srv.key}"),
                          ("content-type", "application/json"), ("content-length", str(len(body)))])
    conn.send_data(1, body, end_stream=True)
    s.sendall(conn.data_to_send())
    # The stream is given up after limits.write_timeout_secs and its slot freed.
    deadline = time.time() + 30
    line = None
    while time.time() < deadline and line is None:
        for l in srv.logs().splitlines():
            if '"route":"completions"' in l and '"status":408' in l:
                line = json.loads(l)
        conn.ping(b"abcdefgh")  # keep the connection itself busy: only the stream stalls
        s.sendall(conn.data_to_send())
        time.sleep(0.5)
    assert line is not None, srv.logs()[-2000:]
    assert line["completion_tokens"] > 0, line
    assert line["prompt_tokens"] > 0, line
    assert eventually_ok(srv)
    s.close()


def test_an_abandoned_non_streaming_request_is_logged(make_server):
    srv = make_server()
    s = tls(srv, ("http/1.1",))
    body = json.dumps({"model": MODEL_NAME, "max_tokens": 2000, "temperature": 0,
                       "messages": [{"role": "user", "content": "Tell me a long story."}]})
    s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {srv.key}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    time.sleep(0.4)  # generating by then (the first token takes about 0.1 s), far from done
    s.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        lines = [json.loads(l) for l in srv.logs().splitlines() if '"route":"chat"' in l]
        if lines:
            assert lines[-1]["status"] == 499, lines[-1]
            assert lines[-1]["prompt_tokens"] > 0, lines[-1]
            return
        time.sleep(0.3)
    raise AssertionError("no log line for an abandoned request: " + srv.logs()[-2000:])


def test_large_prompts_do_not_stall_other_connections(make_server):
    """Regression: a 1 MB prompt was tokenized on the network thread for over a second before
    being refused, and every other connection (TLS handshakes included) waited."""
    srv = make_server("[limits]\nmax_body_bytes = 2097152\n")
    headers = {"authorization": f"Bearer {srv.key}"}
    huge = "word " * 200_000  # 1 MB: provably too long from its size alone
    big = "word " * 50_000  # 250 KB: must be tokenized to know
    results = {}

    def post(name, text):
        started = time.time()
        r = httpx.post(srv.url + "/v1/chat/completions", verify=srv.ssl_context(), timeout=60, headers=headers,
                       json={"model": MODEL_NAME, "messages": [{"role": "user", "content": text}]})
        results[name] = (r.status_code, r.json()["error"]["code"], time.time() - started)

    threads = [threading.Thread(target=post, args=(f"big{i}", big)) for i in range(3)]
    threads.append(threading.Thread(target=post, args=("huge", huge)))
    for t in threads:
        t.start()
    worst = 0.0
    while any(t.is_alive() for t in threads):
        started = time.time()
        assert keyed_models(srv) == 200
        worst = max(worst, time.time() - started)
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert all(code == 400 and err == "prompt_too_long" for code, err, _ in results.values()), results
    assert results["huge"][2] < 1.0, results
    assert worst < 0.5, f"a concurrent request took {worst:.2f} s"


def h2_request(srv, headers, body=b"", validate=True):
    """One HTTP/2 request; (status, response headers, response body bytes)."""
    s = tls(srv)
    conn = h2_client(s, validate=validate)
    conn.send_headers(1, headers, end_stream=not body)
    if body:
        conn.send_data(1, body, end_stream=True)
    s.sendall(conn.data_to_send())
    status, rheaders, data = None, {}, b""
    s.settimeout(10)
    done = False
    while not done:
        chunk = s.recv(65536)
        if not chunk:
            break
        for ev in conn.receive_data(chunk):
            if isinstance(ev, h2.events.ResponseReceived):
                rheaders = dict(ev.headers)
                status = int(rheaders[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                data += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                done = True
        s.sendall(conn.data_to_send())
    s.close()
    return status, rheaders, data


def test_head_over_http2_has_no_body(server):
    """Regression: HEAD over HTTP/2 sent a body (curl: protocol error)."""
    base = [(":method", "HEAD"), (":scheme", "https"), (":authority", "127.0.0.1")]
    status, _, data = h2_request(server, base + [(":path", "/v1/models")])
    assert status == 401 and data == b"", (status, data)
    status, _, data = h2_request(server, base + [(":path", "/v1/models"),
                                                 ("authorization", f"Bearer {server.key}")])
    assert status == 405 and data == b"", (status, data)


def test_authority_and_host_must_agree_over_http2(server):
    """Regression: a request naming two hosts (:authority and Host) was accepted."""
    base = [(":method", "GET"), (":scheme", "https"), (":path", "/v1/models"),
            (":authority", "127.0.0.1"), ("authorization", f"Bearer {server.key}")]
    status, _, _ = h2_request(server, base)
    assert status == 200
    status, _, data = h2_request(server, base + [("host", "evil.example")], validate=False)
    assert status == 400, (status, data)


def test_active_sequences_gauge_returns_to_zero_when_idle(server):
    """Regression: bulwark_active_sequences kept the last step's value while idle."""
    httpx.post(server.url + "/v1/chat/completions", verify=server.ssl_context(), timeout=60,
               headers={"authorization": f"Bearer {server.key}"},
               json={"model": MODEL_NAME, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]})
    time.sleep(0.3)
    metrics = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    assert "bulwark_active_sequences 0" in metrics, [l for l in metrics.splitlines() if "active" in l]


def test_keys_file_that_is_a_fifo_is_refused_at_once(make_server, tmp_path):
    """Regression: a keys file that is a FIFO hung check-config --check-files."""
    import os
    import subprocess
    from conftest import BIN
    srv = make_server()
    fifo = tmp_path / "fifo-keys"
    os.mkfifo(fifo, 0o600)
    cfg = srv.config.read_text().replace('keys_file = "keys"', f'keys_file = "{fifo}"')
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg)
    for p in ["cert.pem", "key.pem"]:
        os.symlink(srv.dir / p, tmp_path / p) if not (tmp_path / p).exists() else None
    r = subprocess.run([BIN, "check-config", "--config", bad, "--check-files"], capture_output=True, text=True,
                       timeout=20)
    assert r.returncode != 0 and "not a regular file" in r.stderr, r.stderr

"""Socket-level posture of a real server: TLS, refusals at start-up, slow clients, connection
limits, disconnects, logs, metrics and graceful shutdown."""
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import BIN, MODEL, MODEL_NAME, ROOT, Server

ROUTES = [l.split() for l in (ROOT / "engine/tests/data/posture-routes.txt").read_text().splitlines()
          if l and not l.startswith("#")]


def get(server, path, key=None, method="GET", **kw):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(verify=server.ssl_context(), follow_redirects=False) as c:
        return c.request(method, server.url + path, headers=headers, **kw)


def test_every_scanner_route_is_401_over_https(server):
    for _doc, wire, path, _cat, body in ROUTES:
        r = get(server, path, method=wire, json={} if body == "{}" else None)
        assert r.status_code == 401, (wire, path, r.status_code)
        assert "server" not in r.headers
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_tls_versions_alpn_and_no_plaintext(server):
    ctx = server.ssl_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", server.port)) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        assert s.version() in ("TLSv1.3", "TLSv1.2")
        assert s.selected_alpn_protocol() == "h2"
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.minimum_version = ssl.TLSVersion.TLSv1
    with pytest.raises(ssl.SSLError):
        with socket.create_connection(("127.0.0.1", server.port)) as raw, old.wrap_socket(raw):
            pass
    # Plain HTTP on the TLS port gets no HTTP answer.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        data = s.recv(4096)
        assert not data.startswith(b"HTTP/"), data


def test_slow_headers_are_cut_off(make_server):
    srv = make_server("[limits]\nheader_read_timeout_secs = 2\n")
    ctx = srv.ssl_context()
    with socket.create_connection(("127.0.0.1", srv.port)) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        s.settimeout(10)
        started = time.time()
        data = s.recv(4096)
        while data and not data.endswith(b"\r\n\r\n") and b"HTTP/" not in data:
            data = s.recv(4096)
        elapsed = time.time() - started
    assert elapsed < 6, f"slowloris connection held {elapsed:.1f}s"


def test_connection_limit_answers_503_naming_it(make_server):
    srv = make_server("[limits]\nmax_connections = 2\n")
    refused = 'bulwark_responses_total{status="503",reason="limits.max_connections"}'
    ctx = srv.ssl_context()
    held = []
    for _ in range(2):
        raw = socket.create_connection(("127.0.0.1", srv.port))
        held.append(ctx.wrap_socket(raw, server_hostname="127.0.0.1"))
    time.sleep(0.3)
    r = get(srv, "/v1/models", key=srv.key)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert "limits.max_connections" in r.json()["error"]["message"]
    assert metric(srv, refused) == 1
    for s in held:
        s.close()
    time.sleep(0.3)
    assert get(srv, "/v1/models", key=srv.key).status_code == 200


def metric(server, name):
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_metrics_are_on_their_own_loopback_listener(server):
    assert metric(server, "bulwark_generated_tokens_total") >= 0
    assert get(server, "/metrics").status_code == 401
    assert get(server, "/metrics", key=server.key).status_code == 404


def test_disconnect_mid_stream_frees_the_slot(server):
    before = metric(server, "bulwark_requests_cancelled_total")
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Write a long poem."}],
            "max_tokens": 1500, "stream": True}
    with httpx.Client(verify=server.ssl_context()) as c:
        with c.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {server.key}"}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 4:
                    break
    deadline = time.time() + 10
    while time.time() < deadline:
        if metric(server, "bulwark_requests_cancelled_total") > before and metric(server, "bulwark_active_sequences") == 0:
            return
        time.sleep(0.1)
    pytest.fail("the abandoned stream kept its slot")


def test_logs_have_no_prompt_or_completion_text(server):
    canary = "zebra-canary-7731"
    r = get(server, "/v1/chat/completions", key=server.key, method="POST",
            json={"model": MODEL_NAME, "messages": [{"role": "user", "content": f"Repeat: {canary}"}], "max_tokens": 16,
                  "temperature": 0})
    assert r.status_code == 200
    time.sleep(0.2)
    logs = server.logs()
    assert canary not in logs
    assert "zebra" not in logs
    lines = [json.loads(l) for l in logs.splitlines() if l.startswith("{")]
    entry = [l for l in lines if l.get("request_id") == r.headers["x-request-id"]][0]
    assert entry["key"] == "default" and entry["route"] == "chat" and entry["status"] == 200
    assert entry["prompt_tokens"] > 0 and entry["completion_tokens"] > 0 and "latency_ms" in entry
    assert server.key not in logs


def test_sigterm_finishes_requests_in_flight(make_server):
    srv = make_server()
    result = {}

    def ask():
        result["r"] = get(srv, "/v1/completions", key=srv.key, method="POST", timeout=60,
                          json={"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 48, "temperature": 0})

    t = threading.Thread(target=ask)
    t.start()
    time.sleep(0.5)
    srv.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert result["r"].status_code == 200
    assert result["r"].json()["usage"]["completion_tokens"] == 48
    assert srv.proc.wait(20) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2)


def run_serve(config):
    return subprocess.run([BIN, "serve", "--config", config], capture_output=True, text=True, timeout=60)


def test_startup_refusals_name_the_problem(make_server, tmp_path):
    srv = make_server()
    srv.stop()
    cfg = srv.config.read_text()
    # A private key others can read.
    os.chmod(srv.dir / "key.pem", 0o644)
    r = run_serve(srv.config)
    assert r.returncode != 0 and "key.pem" in r.stderr and "0644" in r.stderr, r.stderr
    os.chmod(srv.dir / "key.pem", 0o600)
    # A group-readable keys file.
    os.chmod(srv.dir / "keys", 0o640)
    r = run_serve(srv.config)
    assert r.returncode != 0 and "keys file" in r.stderr, r.stderr
    os.chmod(srv.dir / "keys", 0o600)
    # A model that is not the pinned one.
    wrong = "0" * 64
    srv.config.write_text(cfg.replace(cfg.split('sha256 = "')[1].split('"')[0], wrong))
    r = run_serve(srv.config)
    assert r.returncode != 0 and wrong in r.stderr and "b179c952" in r.stderr, r.stderr
    # Plaintext on a non-loopback address.
    srv.config.write_text(cfg.replace("listen = \"127.0.0.1", "plaintext = true\nlisten = \"0.0.0.0"))
    r = subprocess.run([BIN, "check-config", "--config", srv.config], capture_output=True, text=True)
    assert r.returncode != 0 and "loopback" in r.stderr, r.stderr
    # An unknown key.
    srv.config.write_text(cfg + "\n[engine]\nthreadz = 2\n")
    r = subprocess.run([BIN, "check-config", "--config", srv.config], capture_output=True, text=True)
    assert r.returncode != 0 and "threadz" in r.stderr, r.stderr


def test_a_model_file_open_for_writing_is_refused_and_its_lease_ends_with_the_load(tmp_path):
    # A copy of the model, so that no other test's server shares the file.
    model = tmp_path / MODEL.name
    model.write_bytes(MODEL.read_bytes())
    srv = Server(tmp_path, model=model)
    try:
        assert "no read lease" not in srv.logs(), srv.logs()
        # Loaded: the lease went with the descriptors, so a writer is not held off.
        fd = os.open(model, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        r = httpx.get(srv.url + "/v1/models", verify=srv.ssl_context(),
                      headers={"authorization": f"Bearer {srv.key}"})
        assert r.status_code == 200
    finally:
        srv.stop()
    # A process holding the model open for writing (it could rewrite it while it is read).
    with open(model, "r+b"):
        r = run_serve(srv.config)
    assert r.returncode != 0, r.stderr
    assert str(model) in r.stderr and "open for writing" in r.stderr, r.stderr
    # The writer gone, the same configuration serves.
    srv.log_path = tmp_path / "again.log"  # what wait_ready reports if it fails
    with open(srv.log_path, "w") as log:
        srv.proc = subprocess.Popen([BIN, "serve", "--config", srv.config], stdout=log,
                                    stderr=subprocess.STDOUT)
    try:
        srv.wait_ready()
    finally:
        srv.proc.terminate()
        srv.proc.wait(20)


def test_plaintext_on_loopback_when_asked(make_server):
    srv = make_server()
    srv.stop()
    cfg = srv.config.read_text().replace('tls_cert = "cert.pem"\ntls_key = "key.pem"\n', "plaintext = true\n")
    srv.config.write_text(cfg)
    proc = subprocess.Popen([BIN, "serve", "--config", srv.config], stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                r = httpx.get(f"http://127.0.0.1:{srv.port}/v1/models", headers={"authorization": f"Bearer {srv.key}"})
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(20)


def test_idle_keep_alive_connections_are_closed(make_server):
    srv = make_server("[limits]\nidle_timeout_secs = 2\n")
    ctx = srv.ssl_context()
    with socket.create_connection(("127.0.0.1", srv.port)) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {srv.key}\r\n\r\n".encode())
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:40]
        s.settimeout(10)
        started = time.time()
        rest = b""
        try:
            while chunk := s.recv(4096):
                rest += chunk
        except (ssl.SSLError, ConnectionResetError):
            pass
        assert time.time() - started < 6, "idle connection kept open"


def test_client_certificates_when_configured(make_server, tmp_path):
    def ossl(*args):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
         "-subj", "/CN=clients", "-keyout", tmp_path / "ca.key", "-out", tmp_path / "ca.pem")
    ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=alice",
         "-keyout", tmp_path / "alice.key", "-out", tmp_path / "alice.csr")
    ext = tmp_path / "ext.cnf"
    ext.write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    ossl("x509", "-req", "-in", tmp_path / "alice.csr", "-CA", tmp_path / "ca.pem", "-CAkey", tmp_path / "ca.key",
         "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", tmp_path / "alice.pem")
    srv = make_server()
    srv.stop()
    cfg = srv.config.read_text().replace('keys_file = "keys"', f'keys_file = "keys"\nclient_ca = "{tmp_path / "ca.pem"}"')
    srv.config.write_text(cfg)
    proc = subprocess.Popen([BIN, "serve", "--config", srv.config], stderr=subprocess.DEVNULL)
    try:
        with_cert = srv.ssl_context()
        with_cert.load_cert_chain(tmp_path / "alice.pem", tmp_path / "alice.key")
        for _ in range(100):
            try:
                r = httpx.get(srv.url + "/v1/models", verify=with_cert, headers={"authorization": f"Bearer {srv.key}"})
                break
            except httpx.ConnectError:
                time.sleep(0.2)
        assert r.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(srv.url + "/v1/models", verify=srv.ssl_context(), headers={"authorization": f"Bearer {srv.key}"})
    finally:
        proc.terminate()
        proc.wait(20)

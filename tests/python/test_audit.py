"""`bulwark audit` flags every exposure of a vLLM-default stand-in, check by check, and passes
Bulwark itself on every check."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, free_port

HERE = Path(__file__).parent
ALL_CHECKS = {
    "use-tls", "cors-not-wide-open", "openai-routes-require-authentication", "custom-inference-routes-not-anonymous",
    "operational-control-routes-not-anonymous", "tokenization-routes-not-anonymous", "docs-not-exposed",
    "openapi-not-exposed", "version-not-exposed", "tokenizer-info-not-exposed", "metrics-not-exposed",
    "load-not-exposed", "development-routes-not-exposed", "profiler-routes-not-exposed", "runtime-lora-not-exposed",
    "auth-edge-cases", "no-errors-or-timeouts",
}


def audit(*args):
    r = subprocess.run([BIN, "audit", *map(str, args), "--format", "json", "--timeout", "5"],
                       capture_output=True, text=True, timeout=120)
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else None), r.stderr


@pytest.fixture
def standin():
    port = free_port()
    p = subprocess.Popen([sys.executable, HERE / "vllm_standin.py", str(port)])
    time.sleep(0.5)
    yield f"http://127.0.0.1:{port}"
    p.terminate()
    p.wait()


def test_flags_every_exposure_of_a_vllm_default_posture(standin, tmp_path):
    keyfile = tmp_path / "key"
    keyfile.write_text("anything\n")
    rc, report, err = audit(standin, "--api-key-file", keyfile)
    assert rc == 1, err
    checks = {c["id"]: c for c in report["checks"]}
    assert set(checks) == ALL_CHECKS
    for cid, c in checks.items():
        assert not c["passed"], f"{cid} should fail against the stand-in"
        assert c["evidence"], cid
    assert any("reflects" in e for e in checks["cors-not-wide-open"]["evidence"])
    assert any("query string" in e for e in checks["auth-edge-cases"]["evidence"])
    assert report["score"] < 10
    assert "anything" not in json.dumps(report), "the key must never be printed"


def test_state_changing_routes_get_no_post_unless_intrusive(standin):
    _, report, _ = audit(standin)
    sent = {p["path"]: p["method"] for p in report["probes"]}
    assert sent["/pause"] == "GET" and sent["/sleep"] == "GET" and sent["/collective_rpc"] == "GET"
    assert sent["/invocations"] == "POST"
    _, report, _ = audit(standin, "--intrusive")
    assert {p["path"]: p["method"] for p in report["probes"]}["/pause"] == "POST"


def test_bulwark_passes_every_check(server, tmp_path):
    keyfile = tmp_path / "key"
    keyfile.write_text(server.key + "\n")
    rc, report, err = audit(server.url, "--ca", server.ca, "--api-key-file", keyfile)
    failed = [c for c in report["checks"] if not c["passed"]]
    assert rc == 0 and not failed, failed
    assert report["score"] == 100 and {c["id"] for c in report["checks"]} == ALL_CHECKS
    assert all(p["anonymous"]["status"] == 401 for p in report["probes"])
    assert server.key not in json.dumps(report)


def test_unreachable_target_exits_2():
    rc, _, err = audit(f"https://127.0.0.1:{free_port()}", "--insecure")
    assert rc == 2 and "cannot reach" in err


def test_flags_plaintext_answered_on_the_tls_port(tmp_path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-addext", "basicConstraints=critical,CA:FALSE",
                    "-keyout", tmp_path / "k.pem", "-out", tmp_path / "c.pem"], check=True, capture_output=True)
    port = free_port()
    p = subprocess.Popen([sys.executable, HERE / "vllm_standin.py", str(port), tmp_path / "c.pem", tmp_path / "k.pem"])
    try:
        time.sleep(0.7)
        rc, report, err = audit(f"https://127.0.0.1:{port}", "--ca", tmp_path / "c.pem")
        assert rc == 1, err
        tls = next(c for c in report["checks"] if c["id"] == "use-tls")
        assert not tls["passed"] and "plain HTTP" in tls["evidence"][0], tls
    finally:
        p.terminate()
        p.wait()


EXPOSURE_CHECKS = ALL_CHECKS - {"use-tls", "cors-not-wide-open", "auth-edge-cases", "no-errors-or-timeouts"}

HOSTILE = r'''
import socket, ssl, sys, threading, time
mode, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen(256)
ctx = None
if len(sys.argv) > 3:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[3], sys.argv[4])
def serve(c):
    try:
        if ctx:
            c = ctx.wrap_socket(c, server_side=True)
        c.recv(65536)
        if mode == "redirect":
            c.sendall(b"HTTP/1.1 302 Found\r\nLocation: https://sso.example/login\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        else:  # black hole: a handshake, then silence
            time.sleep(3600)
    except Exception:
        pass
    finally:
        c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


def hostile(mode, tmp_path, tls=False):
    port = free_port()
    args = [sys.executable, "-c", HOSTILE, mode, str(port)]
    if tls:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-addext", "basicConstraints=critical,CA:FALSE",
                        "-keyout", tmp_path / "k.pem", "-out", tmp_path / "c.pem"], check=True, capture_output=True)
        args += [tmp_path / "c.pem", tmp_path / "k.pem"]
    p = subprocess.Popen(args)
    time.sleep(0.5)
    return p, port


def test_a_redirecting_gateway_is_not_reported_as_exposing_every_route(tmp_path):
    """Regression: an SSO gateway that redirects everything was reported as exposing every
    route (critical false positives)."""
    p, port = hostile("redirect", tmp_path, tls=True)
    try:
        rc, report, err = audit(f"https://127.0.0.1:{port}", "--ca", tmp_path / "c.pem")
        by_id = {c["id"]: c for c in report["checks"]}
        assert all(by_id[i]["verdict"] == "pass" for i in EXPOSURE_CHECKS), \
            [(i, by_id[i]["evidence"][:1]) for i in EXPOSURE_CHECKS if by_id[i]["verdict"] != "pass"]
        assert any("redirect" in n and "sso.example" in n for n in report["notes"]), report["notes"]
    finally:
        p.terminate()
        p.wait()


def test_a_silent_server_is_inconclusive_within_the_deadline(tmp_path):
    """Regression: timeouts counted as passes, and a slow server kept the audit running for
    minutes. Now every undecided check says so, exit 3, and the deadline bounds the run."""
    p, port = hostile("blackhole", tmp_path, tls=True)
    try:
        started = time.time()
        r = subprocess.run([BIN, "audit", f"https://127.0.0.1:{port}", "--ca", tmp_path / "c.pem", "--format", "json",
                            "--timeout", "2", "--deadline", "6"], capture_output=True, text=True, timeout=60)
        took = time.time() - started
        report = json.loads(r.stdout)
        assert r.returncode == 3, (r.returncode, r.stderr)
        assert took < 15, took
        by_id = {c["id"]: c for c in report["checks"]}
        assert all(by_id[i]["verdict"] == "inconclusive" for i in EXPOSURE_CHECKS), by_id
        assert not any(c["verdict"] == "fail" for c in report["checks"]), report["checks"]
    finally:
        p.terminate()
        p.wait()


def test_usage_errors_exit_2_not_like_findings():
    for url in ["not a url", "ftp://127.0.0.1/", "https://127.0.0.1:notaport/"]:
        r = subprocess.run([BIN, "audit", url], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, (url, r.returncode, r.stderr)
        assert "error" in r.stderr.lower(), r.stderr

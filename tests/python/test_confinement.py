"""The server as deployed confines itself: every thread seccomp-filtered, no privileges, no
descriptors to secrets, and it keeps serving (streams, concurrency, disconnects, SIGTERM)."""
import os
import signal
import threading
import time
from pathlib import Path

import httpx

from conftest import MODEL, MODEL_NAME


def status_fields(path):
    out = {}
    for line in Path(path).read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def test_every_thread_is_confined(server):
    # Make sure the compute pool and runtime threads exist.
    httpx.post(server.url + "/v1/completions", verify=server.ssl_context(), timeout=60,
               headers={"authorization": f"Bearer {server.key}"},
               json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 4})
    tasks = list(Path(f"/proc/{server.proc.pid}/task").iterdir())
    assert len(tasks) >= 3
    for t in tasks:
        s = status_fields(t / "status")
        assert s["Seccomp"] == "2", (t, s["Seccomp"])
        assert s["NoNewPrivs"] == "1", t
        assert int(s["CapEff"], 16) == 0 and int(s["CapBnd"], 16) == 0, t
        assert int(s["CapPrm"], 16) == 0 and int(s["CapAmb"], 16) == 0, t
        if os.geteuid() == 0:
            assert all(u != "0" for u in s["Uid"].split()), (t, s["Uid"])
            assert all(g != "0" for g in s["Gid"].split()), (t, s["Gid"])
    assert "sandbox fully enforced" in server.logs()
    metrics = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    assert "bulwark_sandbox_enforced 1" in metrics


def test_no_descriptor_to_any_secret_or_file(server):
    fd_dir = Path(f"/proc/{server.proc.pid}/fd")
    targets = [os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)]
    secrets = [str(server.dir / n) for n in ("keys", "key.pem", "cert.pem", "bulwark.toml")] + [str(MODEL.resolve())]
    for t in targets:
        assert t not in secrets, t
        assert not t.startswith("/") or t in ("/dev/null", str(server.log_path)) or t.startswith("/dev/pts"), t


def test_confined_server_keeps_serving_until_sigterm(make_server):
    srv = make_server()
    errors = []

    def stream(n, disconnect):
        try:
            with httpx.Client(verify=srv.ssl_context(), timeout=120) as c:
                with c.stream("POST", srv.url + "/v1/chat/completions",
                              headers={"authorization": f"Bearer {srv.key}"},
                              json={"model": MODEL_NAME, "stream": True, "max_tokens": 24 if not disconnect else 400,
                                    "messages": [{"role": "user", "content": f"Tell me fact number {n}."}]}) as r:
                    assert r.status_code == 200
                    for i, line in enumerate(r.iter_lines()):
                        if disconnect and i > 3:
                            return
                    assert line == "data: [DONE]" or line == "", line
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=stream, args=(i, i % 3 == 0)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    srv.proc.send_signal(signal.SIGTERM)
    rc = srv.proc.wait(30)
    assert rc == 0, f"exit {rc} (a negative number is the signal, -31 is a seccomp kill)\n{srv.logs()}"


def test_compute_pools_are_created_confined_on_many_cores(make_server):
    # More compute threads than this machine has cores: the pools must still be created after
    # confinement, by the inference thread, and carry its narrower filter.
    srv = make_server("[engine]\nthreads = 4\n")
    r = httpx.post(srv.url + "/v1/chat/completions", verify=srv.ssl_context(), timeout=120,
                   headers={"authorization": f"Bearer {srv.key}"},
                   json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                         "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    names = {}
    for t in Path(f"/proc/{srv.proc.pid}/task").iterdir():
        s = status_fields(t / "status")
        names.setdefault(s["Name"], []).append(int(s["Seccomp_filters"]))
    compute = [n for n in names if n.startswith(("bulwark-compute", "candle-bp"))]
    assert compute, names
    for n in compute + ["bulwark-infer"]:
        assert all(f == 3 for f in names[n]), (n, names[n])
    for n in ("bulwark", "bulwark-io"):
        assert all(f == 2 for f in names[n]), (n, names[n])

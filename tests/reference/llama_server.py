"""Driving llama.cpp's `llama-server` for reference data: start it on a model, wait until it
answers /health, post JSON, stop it. Shared by tests/reference/make_greedy_reference.py and
tests/models/make_reference.py."""
import contextlib
import json
import subprocess
import time
import urllib.request


class LlamaServer:
    def __init__(self, port):
        self.port = port

    def post(self, path, body):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                     data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)

    def wait_ready(self, proc):
        for _ in range(600):
            if proc.poll() is not None:
                raise SystemExit("llama-server exited during start-up")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("llama-server did not become ready")


@contextlib.contextmanager
def running(bin_dir, model, port, *args):
    """llama-server on `model` (loopback, `port`, extra `args`), ready; stopped on exit."""
    proc = subprocess.Popen([str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1",
                             "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = LlamaServer(port)
    try:
        server.wait_ready(proc)
        yield server
    finally:
        proc.terminate()
        proc.wait()

"""Fixtures: a real `bulwark serve` process on the demo model, set up with `bulwark init`."""
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("BULWARK_BIN", ROOT / "target/release/bulwark"))
DEMO = json.loads((ROOT / "scripts/demo-model.json").read_text())  # the one place it is written
MODEL = Path(os.environ.get("BULWARK_TEST_MODEL", ROOT / DEMO["dir"] / DEMO["file"]))
MODEL_NAME = DEMO["name"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running server; stopped (SIGTERM, then SIGKILL) when the fixture ends."""

    def __init__(self, tmp: Path, extra_config: str = "", init_args=(), model: Path = MODEL,
                 model_keys: str = "", context_length: int | None = 2048):
        assert BIN.exists(), f"{BIN} missing: build with cargo build --release"
        assert model.exists(), f"{model} missing: run scripts/fetch-model.sh"
        self.dir = tmp / "srv"
        self.port = free_port()
        self.metrics_port = free_port()
        out = subprocess.run([BIN, "init", "--dir", self.dir, "--model", model,
                              "--listen", f"127.0.0.1:{self.port}", "--name", MODEL_NAME, *init_args],
                             check=True, capture_output=True, text=True).stdout
        last = out.strip().splitlines()[-1]
        assert last.startswith("api key: "), out
        self.key = last.removeprefix("api key: ")
        self.config = self.dir / "bulwark.toml"
        text = self.config.read_text()
        if context_length is not None:
            model_keys = f"context_length = {context_length}\n{model_keys}"
        text = text.replace("[model]", f"[model]\n{model_keys}", 1)
        text += f"\n[metrics]\nlisten = \"127.0.0.1:{self.metrics_port}\"\n" + extra_config
        self.config.write_text(text)
        self.ca = self.dir / "cert.pem"
        self.url = f"https://127.0.0.1:{self.port}"
        self.log_path = tmp / "server.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([BIN, "serve", "--config", self.config, "--log-format", "json"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self, timeout=60):
        # The port is bound before the model loads; ready means a request is answered.
        import httpx
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                r = httpx.get(self.url + "/health", verify=self.ssl_context(), timeout=2,
                              headers={"authorization": f"Bearer {self.key}"})
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server did not start")

    def ssl_context(self):
        ctx = ssl.create_default_context(cafile=str(self.ca))
        return ctx

    def logs(self):
        self.log.flush()
        return self.log_path.read_text()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("bulwark"))
    yield s
    s.stop()


@pytest.fixture
def make_server(tmp_path):
    made = []

    def make(extra_config="", init_args=()):
        s = Server(tmp_path / str(len(made)), extra_config, init_args)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


@pytest.fixture
def client(server):
    import httpx
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key=server.key,
                  http_client=httpx.Client(verify=server.ssl_context()), max_retries=0)

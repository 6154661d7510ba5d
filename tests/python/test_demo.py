"""The README's first command as a new user runs it: root, a clone in a home directory that
only root may enter (/root is 0700 on Debian), `./scripts/demo.sh`, then the call it prints.

Regression test for the broken first run: the server dropped to `nobody` before opening the
model, and `nobody` cannot traverse a 0700 directory, so the demo died with EACCES.
"""
import os
import shutil
import subprocess
import time

import httpx
import pytest
from openai import OpenAI

from conftest import BIN, MODEL, MODEL_NAME, ROOT, free_port


@pytest.mark.skipif(os.geteuid() != 0, reason="the first run under test is root's")
def test_demo_serves_from_a_clone_in_a_private_home(tmp_path):
    home = tmp_path / "root-home"
    home.mkdir(mode=0o700)
    clone = home / "bulwark"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    # Reuse what the test command already built and fetched; the demo re-verifies the model.
    (clone / ".venv").symlink_to(ROOT / ".venv")
    (clone / ".demo/model").mkdir(parents=True)
    shutil.copy(MODEL, clone / ".demo/model")
    port = free_port()
    env = {**os.environ, "BULWARK_BIN": str(BIN), "BULWARK_LISTEN": f"127.0.0.1:{port}"}
    log = open(tmp_path / "demo.log", "w+")
    proc = subprocess.Popen([str(clone / "scripts/demo.sh")], cwd=clone, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        key = wait_for_key(proc, log)
        cert = clone / ".demo/server/cert.pem"
        # The condition of the bug: the engine's user cannot even reach the model file.
        nobody_reads = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "test", "-r",
             str(clone / ".demo/model" / MODEL.name)])
        assert nobody_reads.returncode != 0
        c = OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key=key, max_retries=0,
                   http_client=httpx.Client(verify=str(cert)))
        deadline = time.time() + 90
        while True:
            try:
                r = c.chat.completions.create(
                    model=MODEL_NAME, temperature=0, max_tokens=16,
                    messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
                break
            except Exception:  # noqa: BLE001 - still loading
                assert proc.poll() is None, read(log)
                assert time.time() < deadline, read(log)
                time.sleep(0.5)
        assert "Paris" in r.choices[0].message.content, r
        assert "sandbox fully enforced" in read(log)
    finally:
        proc.terminate()
        proc.wait(20)


def read(log):
    log.flush()
    log.seek(0)
    return log.read()


def wait_for_key(proc, log, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = read(log).splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Bulwark is starting") and i + 2 < len(lines):
                return lines[i + 2].strip()
        assert proc.poll() is None, read(log)
        time.sleep(0.2)
    raise TimeoutError(read(log))

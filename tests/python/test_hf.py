"""A Hugging Face directory served as a user would: `bulwark init --model DIR` pins every file
(model.files), `bulwark serve` confines itself and loads the safetensors weights, and the
official OpenAI client gets what the GGUF the directory was written from gives
(tests/models/make-hf-fixtures.sh writes it; scripts/test.sh runs that first)."""
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import BIN, Server, free_port

FIXTURES = Path(os.environ.get("BULWARK_FIXTURES", Path.home() / ".cache/bulwark/fixtures"))
HF_DIR = FIXTURES / "smollm2-hf"
QUESTIONS = ["What is the capital of France? Answer in one sentence.", "Why do cats purr?"]


def client_of(server):
    return OpenAI(base_url=server.url + "/v1", api_key=server.key,
                  http_client=httpx.Client(verify=server.ssl_context()), max_retries=0)


def answers(server):
    c = client_of(server)
    out = []
    for q in QUESTIONS:
        r = c.chat.completions.create(model=c.models.list().data[0].id, temperature=0, max_tokens=24,
                                      messages=[{"role": "user", "content": q}])
        out.append((r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens))
    return out


@pytest.fixture(scope="module")
def hf_dir():
    if not (HF_DIR / "config.json").exists():
        pytest.fail(f"{HF_DIR} missing: run tests/models/make-hf-fixtures.sh")
    return HF_DIR


def test_the_directory_serves_the_ggufs_answers(hf_dir, tmp_path):
    hf = Server(tmp_path / "hf", model=hf_dir)
    try:
        config = hf.config.read_text()
        assert "[model.files]" in config and "sha256 =" not in config, config
        assert "sandbox fully enforced" in hf.logs()
        from_hf = answers(hf)
    finally:
        hf.stop()
    # The GGUF on the same arithmetic (f32 weights): the directory holds its dequantized values.
    gguf = Server(tmp_path / "gguf", model_keys='weights = "f32"\n')
    try:
        from_gguf = answers(gguf)
    finally:
        gguf.stop()
    assert from_hf == from_gguf
    assert "Paris" in from_hf[0][0], from_hf


def test_an_altered_file_stops_the_server_before_parsing(hf_dir, tmp_path):
    """The pins written by init, then one file changed: serve refuses it by name and never
    reaches the model loader."""
    copy = tmp_path / "model"
    copy.mkdir()
    for f in hf_dir.iterdir():
        (copy / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, copy / f.name)
    out = tmp_path / "srv"
    subprocess.run([BIN, "init", "--dir", out, "--model", copy, "--listen", f"127.0.0.1:{free_port()}"],
                   check=True, capture_output=True)
    cfg = (copy / "tokenizer_config.json").read_text().replace('"add_bos_token": false', '"add_bos_token": true')
    (copy / "tokenizer_config.json").write_text(cfg)
    r = subprocess.run([BIN, "serve", "--config", out / "bulwark.toml"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert "tokenizer_config.json" in r.stderr and "refusing to load it" in r.stderr, r.stderr
    assert "model loaded" not in r.stderr


def test_model_hash_prints_the_table_init_pins(hf_dir, tmp_path):
    """Every file the loader reads, and nothing else: a README, custom code or a stray
    model.safetensors beside the index is not pinned (the loader never opens them)."""
    copy = tmp_path / "model"
    copy.mkdir()
    for f in hf_dir.iterdir():
        (copy / f.name).symlink_to(f)
    for extra in ["README.md", "modeling_x.py", "model.safetensors"]:
        (copy / extra).write_text("not read\n")
    table = subprocess.run([BIN, "model", "hash", copy], check=True, capture_output=True,
                           text=True).stdout
    assert table.startswith("[model.files]\n")
    names = [line.split(" = ")[0].strip('"') for line in table.splitlines()[1:]]
    assert names == sorted(p.name for p in hf_dir.iterdir()), names

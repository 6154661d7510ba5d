"""`bulwark firewall apply` and `verify` in a network namespace: a clean apply verifies, and
drift (a changed rule, an added rule, a removed table) is caught and named."""
import subprocess
import uuid

import pytest

from conftest import BIN


def ns_run(ns, *cmd, check=True):
    return subprocess.run(["ip", "netns", "exec", ns, *map(str, cmd)], capture_output=True, text=True, check=check)


@pytest.fixture
def netns():
    name = f"bwfw-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def test_verify_catches_drift(make_server, netns):
    srv = make_server()
    srv.stop()
    cfg = srv.config
    ns_run(netns, BIN, "firewall", "apply", "--config", cfg)
    ok = ns_run(netns, BIN, "firewall", "verify", "--config", cfg, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    listing = ns_run(netns, "nft", "-a", "list", "chain", "inet", "bulwark", "input").stdout
    line = next(l for l in listing.splitlines() if "API: open to clients" in l)
    handle = line.rsplit("handle", 1)[1].strip()
    ns_run(netns, "nft", "replace", "rule", "inet", "bulwark", "input", "handle", handle,
           "tcp", "dport", "1", "accept", "comment", '"API: open to clients"')
    ns_run(netns, "nft", "add", "rule", "inet", "bulwark", "input", "tcp", "dport", "22", "accept")
    drift = ns_run(netns, BIN, "firewall", "verify", "--config", cfg, check=False)
    assert drift.returncode == 1
    assert "changed:" in drift.stdout and "tcp dport 1 accept" in drift.stdout, drift.stdout
    assert "added:   tcp dport 22 accept" in drift.stdout, drift.stdout
    ns_run(netns, "nft", "delete", "table", "inet", "bulwark")
    gone = ns_run(netns, BIN, "firewall", "verify", "--config", cfg, check=False)
    assert gone.returncode == 1 and "not loaded" in gone.stdout
    # apply again restores it, atomically replacing whatever is there.
    ns_run(netns, BIN, "firewall", "apply", "--config", cfg)
    ns_run(netns, BIN, "firewall", "apply", "--config", cfg)
    assert ns_run(netns, BIN, "firewall", "verify", "--config", cfg, check=False).returncode == 0

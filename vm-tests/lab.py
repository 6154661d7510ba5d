#!/usr/bin/env python3
"""The network-namespace lab: runs a topology (vm-tests/topologies/*.toml) on this host.

One namespace per node, all joined by a bridge that lives in a namespace of its own (the host's
network is never touched). Engines get their generated firewall (`bulwark firewall apply`,
then `verify`), are started confined, and every expectation is checked with real connections.
Everything is torn down at the end, even when a check fails. Needs root, iproute2, nftables.

Usage: lab.py TOPOLOGY.toml [--bin target/release/bulwark] [--model FILE]
"""
import argparse
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "bwlab"
ENGINE_USER = "nobody"
CONNECT_TIMEOUT = 2.0

PROBE = r'''
import socket, ssl, sys, json, http.client
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "connect":
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(float(sys.argv[4]))
    try:
        s.connect((host, port)); print("open")
    except OSError as e:
        print("closed", e)
elif mode == "tls":
    ctx = ssl.create_default_context(cafile=sys.argv[4])
    try:
        with socket.create_connection((host, port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=host):
            print("tls-ok")
    except ssl.SSLError as e:
        print("tls-reject", e)
    except OSError as e:
        print("closed", e)
elif mode == "http":
    ctx = ssl.create_default_context(cafile=sys.argv[4])
    key = sys.argv[5] if len(sys.argv) > 5 else None
    c = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
    c.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    print(c.getresponse().status)
'''


def sh(*args, check=True, ns=None, **kw):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [str(a) for a in args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


class Lab:
    def __init__(self, topo, bin_path, model):
        self.topo = topo
        self.bin = bin_path
        self.model = model
        self.procs = []
        self.namespaces = []
        self.tmp = Path(tempfile.mkdtemp(prefix="bwlab-"))
        os.chmod(self.tmp, 0o755)
        self.nodes = {n["name"]: n for n in topo["nodes"]}
        self.keys = {}
        self.failures = []

    def ns(self, node):
        return f"{PREFIX}-{node}"

    def up(self):
        switch = f"{PREFIX}-switch"
        sh("ip", "netns", "add", switch)
        self.namespaces.append(switch)
        sh("ip", "link", "add", "br0", "type", "bridge", ns=switch)
        sh("ip", "link", "set", "br0", "up", ns=switch)
        prefix_len = self.topo["subnet"].split("/")[1]
        for i, (name, node) in enumerate(self.nodes.items()):
            ns = self.ns(name)
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
            sh("ip", "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns, ns=switch)
            sh("ip", "link", "set", f"p{i}", "master", "br0", ns=switch)
            sh("ip", "link", "set", f"p{i}", "up", ns=switch)
            sh("ip", "addr", "add", f"{node['address']}/{prefix_len}", "dev", "eth0", ns=ns)
            sh("ip", "link", "set", "eth0", "up", ns=ns)
            for svc in node.get("services", []):
                self.spawn(ns, [sys.executable, "-c",
                                "import socket,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
                                f"s.bind(('0.0.0.0',{svc['port']}));s.listen(16)\nwhile True: c,_=s.accept(); c.close()"])
            if node["role"] == "engine":
                self.start_engine(name, node)
        for name, node in self.nodes.items():
            for svc in node.get("services", []):
                self.wait_port(self.ns(name), "127.0.0.1", svc["port"])

    def spawn(self, ns, cmd, log=None):
        p = subprocess.Popen(["ip", "netns", "exec", ns] + [str(c) for c in cmd],
                             stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def wait_port(self, ns, host, port, timeout=90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = sh(sys.executable, "-c", PROBE, "connect", host, port, "1", ns=ns, check=False)
            if r.stdout.startswith("open"):
                return
            time.sleep(0.3)
        raise TimeoutError(f"{ns}: {host}:{port} never opened")

    def start_engine(self, name, node):
        ns = self.ns(name)
        d = self.tmp / name
        out = sh(self.bin, "init", "--dir", d, "--model", self.model,
                 "--listen", f"{node['address']}:{node['api_port']}", "--name", "smollm2").stdout
        self.keys[name] = out.strip().splitlines()[-1].removeprefix("api key: ")
        cfg = d / "bulwark.toml"
        text = cfg.read_text().replace("[model]", "[model]\ncontext_length = 2048", 1)
        metrics_addr = "0.0.0.0" if node.get("metrics_public") else "127.0.0.1"
        text += (f"\n[metrics]\nlisten = \"{metrics_addr}:{node['metrics_port']}\"\n"
                 f"allow_non_loopback = {'true' if node.get('metrics_public') else 'false'}\n"
                 f"\n[sandbox]\nuser = \"{ENGINE_USER}\"\n")
        cfg.write_text(text)
        sh(self.bin, "firewall", "apply", "--config", cfg, ns=ns)
        v = sh(self.bin, "firewall", "verify", "--config", cfg, ns=ns, check=False)
        self.record(f"{name}: firewall verify after apply", v.returncode == 0, v.stdout + v.stderr)
        log = open(self.tmp / f"{name}.log", "w")
        self.spawn(ns, [self.bin, "serve", "--config", cfg], log=log)
        self.wait_port(ns, node["address"], node["api_port"])
        # The port is bound before the model loads: wait until the engine says it serves.
        deadline = time.time() + 90
        while "serving" not in (self.tmp / f"{name}.log").read_text():
            if time.time() > deadline:
                raise TimeoutError(f"{name} never started serving")
            time.sleep(0.2)
        node["_config"] = cfg
        node["_ca"] = d / "cert.pem"

    def port_of(self, node, port_name):
        if port_name == "api":
            return node["api_port"]
        if port_name == "metrics":
            return node["metrics_port"]
        for s in node.get("services", []):
            if s["name"] == port_name:
                return s["port"]
        raise KeyError(f"{node['name']} has no port named {port_name}")

    def probe(self, ns, as_user, *args):
        cmd = [sys.executable, "-c", PROBE, *map(str, args)]
        if as_user == "engine-user":
            uid = int(sh("id", "-u", ENGINE_USER).stdout)
            gid = int(sh("id", "-g", ENGINE_USER).stdout)
            cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"] + cmd
        return sh(*cmd, ns=ns, check=False).stdout.strip()

    def record(self, what, ok, detail=""):
        print(f"{'PASS' if ok else 'FAIL'}  {what}" + ("" if ok else f"\n      {detail.strip()}"), flush=True)
        if not ok:
            self.failures.append(what)

    def check(self, e):
        src, dst = self.nodes[e["from"]], self.nodes[e["to"]]
        port = self.port_of(dst, e["port"])
        host = "127.0.0.1" if e.get("via") == "loopback" else dst["address"]
        who = e.get("as", "root")
        what = f"{e['from']}({who}) -> {e['to']}:{e['port']} ({host}:{port}) is {e['result']}"
        ns = self.ns(e["from"])
        r = e["result"]
        if r in ("open", "closed"):
            out = self.probe(ns, who, "connect", host, port, CONNECT_TIMEOUT)
            self.record(what, out.split()[0] == r, out)
        elif r == "tls-reject":
            out = self.probe(ns, who, "tls", host, port, dst["_ca"])
            self.record(what, out.startswith("tls-reject"), out)
        elif r == "auth-required":
            anon = self.probe(ns, who, "http", host, port, dst["_ca"])
            keyed = self.probe(ns, who, "http", host, port, dst["_ca"], self.keys[dst["name"]])
            self.record(what, anon == "401" and keyed == "200", f"without key: {anon}, with key: {keyed}")
        else:
            self.record(what, False, f"unknown result {r}")

    def audit_engines(self):
        """`bulwark audit` against every engine, from the first client node: every check passes."""
        clients = [n for n, node in self.nodes.items() if node["role"] == "client"]
        if not clients:
            return
        for name, node in self.nodes.items():
            if node["role"] != "engine":
                continue
            keyfile = self.tmp / f"{name}.key"
            keyfile.write_text(self.keys[name] + "\n")
            r = sh(self.bin, "audit", f"https://{node['address']}:{node['api_port']}", "--ca", node["_ca"],
                   "--api-key-file", keyfile, ns=self.ns(clients[0]), check=False)
            self.record(f"{clients[0]} -> {name}: bulwark audit passes every check", r.returncode == 0, r.stdout + r.stderr)

    def down(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("topology")
    ap.add_argument("--bin", default=str(ROOT / "target/release/bulwark"))
    ap.add_argument("--model", default=str(ROOT / ".demo/model/SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("the lab needs root (network namespaces, nftables)")
    topo = tomllib.loads(Path(args.topology).read_text())
    # A previous run that was killed may have left namespaces behind.
    for line in sh("ip", "netns", "list").stdout.splitlines():
        if line.startswith(PREFIX + "-"):
            sh("ip", "netns", "del", line.split()[0], check=False)
    lab = Lab(topo, args.bin, args.model)
    try:
        lab.up()
        for e in topo.get("expect", []):
            lab.check(e)
        lab.audit_engines()
        for name, node in lab.nodes.items():
            if node["role"] == "engine":
                for p in lab.procs:
                    if p.poll() is not None and p.returncode not in (0, None):
                        lab.record(f"{name}: engine still running", False, (lab.tmp / f"{name}.log").read_text())
    except Exception as e:  # noqa: BLE001
        lab.record("lab set-up", False, repr(e))
    finally:
        lab.down()
    print(f"topology {topo['name']}: {'all checks passed' if not lab.failures else f'{len(lab.failures)} failed'}")
    sys.exit(1 if lab.failures else 0)


if __name__ == "__main__":
    main()

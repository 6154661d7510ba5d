#!/usr/bin/env python3
"""The network-namespace lab: runs a topology (vm-tests/topologies/*.toml) on this host.

One namespace per node, all joined by a bridge that lives in a namespace of its own (the host's
network is never touched). Cluster nodes (head, workers) get certificates from a cluster CA made
with `bulwark certs`; every node running bulwark gets its generated firewall (`bulwark firewall
apply`, then `verify`) unless the topology says `firewall = false`, and is started confined
(workers before the head). Every expectation is checked with real connections, then the faults
run in order with their own expectations, then every API is audited (`bulwark audit`).
`same-tokens` compares against a single-node reference engine run first in a namespace of its
own. Everything is torn down at the end, even when a check fails. Needs root, iproute2, nftables.
The format is in vm-tests/README.md (the contract).

Usage: lab.py TOPOLOGY.toml [--bin target/release/bulwark] [--model FILE]
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "bwlab"
ENGINE_USER = "nobody"
MODEL_NAME = "smollm2"
CONTEXT_LENGTH = 2048
# `closed` means no TCP connection within this many seconds (vm-tests/README.md).
CONNECT_TIMEOUT = 2.0
# After a cluster TLS handshake, a connection the server keeps open this long was accepted.
CLUSTER_ACCEPT_WAIT = 2.0
CLUSTER_ALPN = "bulwark-cluster/1"
# Model load, warm-up and confinement on a small CPU machine, with room for a busy one.
START_TIMEOUT = 180
# Greedy completions compared with the single-node reference: long enough that a wrong
# activation anywhere in the pipeline shows, short enough for two cores.
SAME_TOKENS_MAX = 48
DEFAULT_PROMPT = "What is the capital of France?"
ENGINE_ROLES = ("engine", "head", "worker")
ROLES = ENGINE_ROLES + ("client",)

# Runs inside a node's namespace (as root or as the engine's user); one JSON argument, one line
# of output.
PROBE = r'''
import json, socket, ssl, sys, time, http.client
a = json.loads(sys.argv[1])
mode, host, port = a["mode"], a["host"], a["port"]
if mode == "connect":
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(a["timeout"])
    try:
        s.connect((host, port)); print("open")
    except OSError as e:
        print("closed", e)
elif mode == "tls":
    ctx = ssl.create_default_context(cafile=a["ca"])
    try:
        with socket.create_connection((host, port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=host):
            print("tls-ok")
    except ssl.SSLError as e:
        print("tls-reject", e)
    except OSError as e:
        print("closed", e)
elif mode == "cluster":
    # A TLS 1.3 client with the cluster's ALPN, presenting the given certificate (or none). The
    # server is verified against the cluster CA, so that a rejection is the server's doing.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(a["ca"])
    ctx.set_alpn_protocols([a["alpn"]])
    if a.get("cert"):
        ctx.load_cert_chain(a["cert"], a["key"])
    try:
        raw = socket.create_connection((host, port), timeout=a["timeout"])
    except OSError as e:
        print("closed", e); sys.exit()
    try:
        s = ctx.wrap_socket(raw, server_hostname=a["server_name"])
    except ssl.SSLCertVerificationError as e:
        print("unverified the server's certificate does not chain to the cluster CA:", e); sys.exit()
    except (ssl.SSLError, OSError) as e:
        print("rejected in the handshake:", e); sys.exit()
    # TLS 1.3: the client finishes before the server has judged its certificate; the verdict
    # (an alert or a close) follows. One byte is a prefix of any frame, so a server that
    # accepted us keeps waiting for the rest.
    alpn = s.selected_alpn_protocol()
    deadline = time.time() + a["wait"]
    got = 0
    try:
        s.sendall(b"\x00")
        while True:
            left = deadline - time.time()
            if left <= 0:
                break
            s.settimeout(left)
            data = s.recv(4096)
            if not data:
                print(f"rejected: closed after the handshake ({got} bytes received, alpn {alpn})"); sys.exit()
            got += len(data)
    except (socket.timeout, TimeoutError):
        pass
    except (ssl.SSLError, OSError) as e:
        print(f"rejected after the handshake: {e} (alpn {alpn})"); sys.exit()
    print(f"accepted: open for {a['wait']} s ({got} bytes received, alpn {alpn})")
elif mode == "http":
    ctx = ssl.create_default_context(cafile=a["ca"])
    c = http.client.HTTPSConnection(host, port, context=ctx, timeout=a["timeout"])
    headers = {"Authorization": f"Bearer {a['key']}"} if a.get("key") else {}
    body = None
    if a.get("json") is not None:
        body = json.dumps(a["json"])
        headers["Content-Type"] = "application/json"
    try:
        c.request(a.get("method", "GET"), a["path"], body=body, headers=headers)
        r = c.getresponse()
        print(json.dumps({"status": r.status, "body": r.read().decode("utf-8", "replace")}))
    except Exception as e:
        print(json.dumps({"status": None, "error": f"{type(e).__name__}: {e}"}))
'''


def sh(*args, check=True, ns=None, **kw):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [str(a) for a in args]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {(r.stderr or r.stdout).strip()}")
    return r


def toml_str(s):
    # A TOML basic string: JSON's escapes are a subset of TOML's.
    return json.dumps(str(s))


def chat_body(prompt, max_tokens):
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": max_tokens}


def prompts_of(e):
    return list(e.get("prompts") or [e.get("prompt", DEFAULT_PROMPT)])


def openai_error(body):
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), or None."""
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return err.get("message") if isinstance(err, dict) and isinstance(err.get("message"), str) else None


class Lab:
    def __init__(self, topo, bin_path, model):
        self.topo = topo
        self.bin = bin_path
        self.model = model
        self.nodes = {n["name"]: n for n in topo["nodes"]}
        self.validate()
        self.procs = []
        self.namespaces = []
        self.tmp = Path(tempfile.mkdtemp(prefix="bwlab-"))
        os.chmod(self.tmp, 0o755)
        self.keys = {}
        self.failures = []
        self.reference = {}  # prompt -> the single-node engine's completion

    # --- the topology -------------------------------------------------------------------------

    def validate(self):
        for name, node in self.nodes.items():
            if node.get("role") not in ROLES:
                raise ValueError(f"node {name}: role must be one of {', '.join(ROLES)}")
            needs = {"engine": ["api_port"], "head": ["api_port", "layers"], "worker": ["cluster_port", "layers"]}
            for key in needs.get(node["role"], []):
                if key not in node:
                    raise ValueError(f"node {name}: a {node['role']} needs {key}")
        heads = [n for n, node in self.nodes.items() if node["role"] == "head"]
        workers = [n for n, node in self.nodes.items() if node["role"] == "worker"]
        if len(heads) > 1:
            raise ValueError(f"more than one head: {heads}")
        if workers and not heads:
            raise ValueError("workers without a head")
        self.head = heads[0] if heads else None
        # The head's stages: its workers in pipeline order.
        self.stages = sorted(workers, key=lambda n: self.nodes[n]["layers"][0])
        rows = list(self.topo.get("expect", []))
        for f in self.topo.get("fault", []):
            if f.get("action") not in ("kill", "start", "block", "unblock"):
                raise ValueError(f"fault on {f.get('node')}: unknown action {f.get('action')!r}")
            if f.get("node") not in self.nodes:
                raise ValueError(f"fault: unknown node {f.get('node')!r}")
            rows += f.get("expect", [])
        for e in rows:
            for k in ("from", "to"):
                if e.get(k) not in self.nodes:
                    raise ValueError(f"expect: unknown node {e.get(k)!r} in {k}")

    def ns(self, node):
        return f"{PREFIX}-{node}"

    def port_of(self, node, port_name):
        if port_name in ("api", "metrics", "cluster"):
            key = f"{port_name}_port"
            if key not in node:
                raise KeyError(f"{node['name']} has no {key}")
            return node[key]
        for s in node.get("services", []):
            if s["name"] == port_name:
                return s["port"]
        raise KeyError(f"{node['name']} has no port named {port_name}")

    # --- processes ----------------------------------------------------------------------------

    def spawn(self, ns, cmd, log=None, env=None):
        p = subprocess.Popen(["ip", "netns", "exec", ns] + [str(c) for c in cmd],
                             env={**os.environ, "NO_COLOR": "1", **(env or {})},
                             stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def spawn_engine(self, ns, node, cmd, log):
        """Start an engine with a readiness socket of its own (sd_notify's NOTIFY_SOCKET): it
        sends READY=1 once it serves, model loaded (engine/src/notify.rs)."""
        path = self.tmp / f".notify-{node['name']}"
        path.unlink(missing_ok=True)
        node["_ready"] = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        node["_ready"].bind(str(path))
        node["_proc"] = self.spawn(ns, cmd, log=log, env={"NOTIFY_SOCKET": str(path)})

    def wait_ready(self, node, timeout=START_TIMEOUT):
        """Wait for the engine's READY=1, failing at once if it exits first."""
        sock, deadline = node["_ready"], time.time() + timeout
        while time.time() < deadline:
            if node["_proc"].poll() is not None:
                raise RuntimeError(f"{node['name']} exited ({node['_proc'].returncode}) before it was ready:\n"
                                   + node["_log"].read_text(errors="replace")[-3000:])
            sock.settimeout(0.5)
            try:
                if sock.recv(64).startswith(b"READY=1"):
                    sock.close()
                    return
            except TimeoutError:
                continue
        raise TimeoutError(f"{node['name']} never reported READY=1")

    def probe(self, ns, as_user, **args):
        cmd = [sys.executable, "-c", PROBE, json.dumps(args)]
        if as_user == "engine-user":
            uid = int(sh("id", "-u", ENGINE_USER).stdout)
            gid = int(sh("id", "-g", ENGINE_USER).stdout)
            cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"] + cmd
        r = sh(*cmd, ns=ns, check=False)
        return r.stdout.strip() or f"probe error: {r.stderr.strip()[-400:]}"

    def http(self, ns, as_user, host, port, ca, path, key=None, body=None, timeout=10.0):
        out = self.probe(ns, as_user, mode="http", host=host, port=port, ca=str(ca), path=path, key=key,
                         method="POST" if body is not None else "GET", json=body, timeout=max(1.0, timeout))
        try:
            return json.loads(out)
        except ValueError:
            return {"status": None, "error": out or "the probe printed nothing"}

    def wait_port(self, ns, host, port, timeout=START_TIMEOUT, proc=None):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{ns}: the process exited ({proc.returncode}) before {host}:{port} opened")
            r = self.probe(ns, "root", mode="connect", host=host, port=port, timeout=1.0)
            if r.startswith("open"):
                return
            time.sleep(0.3)
        raise TimeoutError(f"{ns}: {host}:{port} never opened")

    # --- configuration ------------------------------------------------------------------------

    def model_sha256(self):
        if not hasattr(self, "_sha"):
            self._sha = sh(self.bin, "model", "hash", self.model).stdout.strip()
        return self._sha

    def init_api_node(self, d, listen, metrics_listen, metrics_public):
        """`bulwark init` in `d`, plus the lab's [model], [metrics] and [sandbox] settings."""
        out = sh(self.bin, "init", "--dir", d, "--model", self.model, "--listen", listen, "--name", MODEL_NAME).stdout
        key = out.strip().splitlines()[-1].removeprefix("api key: ")
        cfg = d / "bulwark.toml"
        text = cfg.read_text().replace("[model]", f"[model]\ncontext_length = {CONTEXT_LENGTH}", 1)
        text += self.metrics_sandbox(metrics_listen, metrics_public)
        cfg.write_text(text)
        return cfg, key

    def metrics_sandbox(self, listen, public):
        return (f"\n[metrics]\nlisten = {toml_str(listen)}\n"
                f"allow_non_loopback = {'true' if public else 'false'}\n"
                f"\n[sandbox]\nuser = {toml_str(ENGINE_USER)}\n")

    def metrics_listen(self, node):
        addr = "0.0.0.0" if node.get("metrics_public") else "127.0.0.1"
        return f"{addr}:{node.get('metrics_port', 9464)}", bool(node.get("metrics_public"))

    def make_certs(self):
        """The cluster CA, one certificate per head and worker, and a foreign CA (docs/cluster.md)."""
        if not self.head:
            return
        self.ca_dir = self.tmp / "cluster-ca"
        self.foreign_ca_dir = self.tmp / "foreign-ca"
        sh(self.bin, "certs", "ca", "--dir", self.ca_dir)
        sh(self.bin, "certs", "ca", "--dir", self.foreign_ca_dir)
        for name in [self.head] + self.stages:
            node = self.nodes[name]
            out = self.tmp / "certs" / name
            out.parent.mkdir(exist_ok=True)
            sh(self.bin, "certs", "issue", "--ca-dir", self.ca_dir, "--name", name, "--ip", node["address"], "--out", out)
            node["_cert"], node["_key"] = out / "cert.pem", out / "key.pem"

    def foreign_cert(self, name, address):
        """A certificate for `name`, signed by a CA the cluster does not trust."""
        out = self.tmp / "foreign" / name
        if not out.exists():
            out.parent.mkdir(exist_ok=True)
            sh(self.bin, "certs", "issue", "--ca-dir", self.foreign_ca_dir, "--name", name, "--ip", address, "--out", out)
        return out / "cert.pem", out / "key.pem"

    def cluster_section(self, node):
        """The node's [cluster] section (docs/cluster.md); its files are copied next to its config."""
        d = node["_dir"] / "cluster"
        d.mkdir(mode=0o700)
        shutil.copy(self.ca_dir / "ca.pem", d / "ca.pem")
        shutil.copy(node["_cert"], d / "cert.pem")
        shutil.copy(node["_key"], d / "key.pem")
        os.chmod(d / "key.pem", 0o600)
        lo, hi = node["layers"]
        text = (f"\n[cluster]\nrole = {toml_str(node['role'])}\nname = {toml_str(node['name'])}\n"
                f"ca = \"cluster/ca.pem\"\ncert = \"cluster/cert.pem\"\nkey = \"cluster/key.pem\"\n"
                f"layers = [{lo}, {hi}]\n")
        if node["role"] == "worker":
            head = self.nodes[self.head]
            listen = "{address}:{cluster_port}".format(**node)
            text += (f"listen = {toml_str(listen)}\n"
                     f"head_name = {toml_str(head['name'])}\nhead_address = {toml_str(head['address'])}\n")
        else:
            for w in self.stages:
                s = self.nodes[w]
                address = "{address}:{cluster_port}".format(**s)
                text += (f"\n[[cluster.stages]]\nname = {toml_str(w)}\naddress = {toml_str(address)}\n"
                         f"layers = [{s['layers'][0]}, {s['layers'][1]}]\n")
        return text

    def write_config(self, name, node):
        role = node["role"]
        listen, public = self.metrics_listen(node)
        d = self.tmp / name
        node["_dir"] = d
        if role == "worker":
            # No [server]: a worker serves no OpenAI API at all.
            d.mkdir(mode=0o700)
            cfg = d / "bulwark.toml"
            cfg.write_text(f"[model]\npath = {toml_str(Path(self.model).resolve())}\n"
                           f"sha256 = {toml_str(self.model_sha256())}\nname = {toml_str(MODEL_NAME)}\n"
                           f"context_length = {CONTEXT_LENGTH}\n"
                           + self.metrics_sandbox(listen, public) + self.cluster_section(node))
        else:
            api = "{address}:{api_port}".format(**node)
            cfg, self.keys[name] = self.init_api_node(d, api, listen, public)
            node["_ca"] = d / "cert.pem"
            if role == "head":
                # After `init`, which wants an empty directory.
                cfg.write_text(cfg.read_text() + self.cluster_section(node))
        node["_config"] = cfg
        node["_log"] = self.tmp / f"{name}.log"
        if node.get("firewall", True):
            sh(self.bin, "firewall", "apply", "--config", cfg, ns=self.ns(name))
            v = sh(self.bin, "firewall", "verify", "--config", cfg, ns=self.ns(name), check=False)
            self.record(f"{name}: firewall verify after apply", v.returncode == 0, v.stdout + v.stderr)

    def start_node(self, name):
        """Start the node's engine and wait until it reports READY=1 (it serves)."""
        node = self.nodes[name]
        ns = self.ns(name)
        with open(node["_log"], "a") as log:
            self.spawn_engine(ns, node, [self.bin, "serve", "--config", node["_config"]], log)
        self.wait_ready(node)

    def wait_pipeline(self):
        """The head answers a chat completion: every stage is connected."""
        head = self.nodes[self.head]
        t0 = time.time()
        last = None
        while time.time() - t0 < START_TIMEOUT:
            last = self.http(self.ns(self.head), "root", head["address"], head["api_port"], head["_ca"],
                             "/v1/chat/completions", key=self.keys[self.head], body=chat_body("Hi", 1), timeout=30)
            if last.get("status") == 200:
                break
            time.sleep(0.5)
        self.record(f"{self.head}: the pipeline answers ({time.time() - t0:.1f} s after the head served)",
                    last.get("status") == 200, json.dumps(last))

    # --- set-up and teardown ------------------------------------------------------------------

    def run_reference(self):
        """Greedy completions of every prompt `same-tokens` uses, from one single-node engine in a
        namespace of its own (loopback only), run once before the topology starts."""
        rows = [e for e in self.topo.get("expect", []) if e.get("result") == "same-tokens"]
        rows += [e for f in self.topo.get("fault", []) for e in f.get("expect", []) if e.get("result") == "same-tokens"]
        prompts = list(dict.fromkeys(p for e in rows for p in prompts_of(e)))
        if not prompts:
            return
        ns = f"{PREFIX}--reference"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
        node = {"name": "reference", "role": "engine", "address": "127.0.0.1", "api_port": 8443,
                "_log": self.tmp / ".reference.log"}
        d = self.tmp / ".reference"
        cfg, key = self.init_api_node(d, "127.0.0.1:8443", "127.0.0.1:9464", False)
        with open(node["_log"], "w") as log:
            self.spawn_engine(ns, node, [self.bin, "serve", "--config", cfg], log)
        self.wait_ready(node)
        for p in prompts:
            r = self.http(ns, "root", "127.0.0.1", 8443, d / "cert.pem", "/v1/chat/completions",
                          key=key, body=chat_body(p, SAME_TOKENS_MAX), timeout=120)
            if r.get("status") != 200:
                raise RuntimeError(f"the reference engine did not answer {p!r}: {json.dumps(r)}")
            self.reference[p] = self.completion(r["body"])
        node["_proc"].terminate()
        node["_proc"].wait(30)
        print(f"reference: {len(prompts)} completions from a single-node engine", flush=True)

    @staticmethod
    def completion(body):
        c = json.loads(body)["choices"][0]
        return {"content": c["message"]["content"], "finish_reason": c.get("finish_reason")}

    def up(self):
        switch = f"{PREFIX}-switch"
        self.switch = switch
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
            node["_port"] = f"p{i}"
            sh("ip", "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns, ns=switch)
            sh("ip", "link", "set", f"p{i}", "master", "br0", ns=switch)
            sh("ip", "link", "set", f"p{i}", "up", ns=switch)
            sh("ip", "addr", "add", f"{node['address']}/{prefix_len}", "dev", "eth0", ns=ns)
            sh("ip", "link", "set", "eth0", "up", ns=ns)
            for svc in node.get("services", []):
                self.spawn(ns, [sys.executable, "-c",
                                "import socket,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
                                f"s.bind(('0.0.0.0',{svc['port']}));s.listen(16)\nwhile True: c,_=s.accept(); c.close()"])
        self.make_certs()
        for name, node in self.nodes.items():
            if node["role"] in ENGINE_ROLES:
                self.write_config(name, node)
        # Workers first: the head connects to them (it also reconnects by itself).
        order = {"worker": 0, "engine": 1, "head": 2}
        for name in sorted((n for n in self.nodes if self.nodes[n]["role"] in ENGINE_ROLES),
                           key=lambda n: order[self.nodes[n]["role"]]):
            self.start_node(name)
        for name, node in self.nodes.items():
            for svc in node.get("services", []):
                self.wait_port(self.ns(name), "127.0.0.1", svc["port"])
        if self.head:
            self.wait_pipeline()

    def save_logs(self, dest):
        """Copy every engine's log and configuration to `dest` (the lab's directory goes away)."""
        dest = Path(dest)
        for name, node in self.nodes.items():
            for what in ("_log", "_config"):
                if node.get(what) and node[what].exists():
                    (dest / name).mkdir(parents=True, exist_ok=True)
                    shutil.copy(node[what], dest / name / node[what].name)

    def show_logs(self, lines=25):
        """The end of every engine's log, printed after a failed run."""
        for name, node in self.nodes.items():
            if node.get("_log") and node["_log"].exists():
                tail = node["_log"].read_text(errors="replace").splitlines()[-lines:]
                print(f"--- {name}: last {len(tail)} lines of its log", *tail, sep="\n", flush=True)

    def down(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- checks -------------------------------------------------------------------------------

    def record(self, what, ok, detail=""):
        print(f"{'PASS' if ok else 'FAIL'}  {what}" + ("" if ok else f"\n      {detail.strip()}"), flush=True)
        if not ok:
            self.failures.append(what)

    def check(self, e, context=""):
        src, dst = self.nodes[e["from"]], self.nodes[e["to"]]
        host = "127.0.0.1" if e.get("via") == "loopback" else dst["address"]
        who = e.get("as", "root")
        r = e["result"]
        what = f"{context}{e['from']}({who}) -> {e['to']}:{e['port']}"
        try:
            port = self.port_of(dst, e["port"])
        except KeyError as err:
            self.record(f"{what} is {r}", False, str(err))
            return
        what += f" ({host}:{port})"
        if e.get("certificate"):
            what += f" presenting {e['certificate']}"
        what += f" is {r}"
        within = e.get("within")
        if within is not None:
            what += f" within {within} s"
        t0 = time.time()
        deadline = t0 + (within or 0)
        while True:
            left = deadline - time.time() if within is not None else None
            try:
                ok, detail = self.attempt(e, src, dst, host, port, who, left)
            except Exception as err:  # noqa: BLE001 (a broken check is a failed check)
                ok, detail = False, repr(err)
            if ok or within is None or time.time() >= deadline:
                break
            time.sleep(0.5)
        if within is not None and ok:
            what += f" (after {time.time() - t0:.1f} s)"
        if ok and r == "tls-reject":
            what += f": {detail[:160]}"  # where it was refused
        self.record(what, ok, detail)

    def attempt(self, e, src, dst, host, port, who, left):
        """One try at an expectation: (passed, what was seen)."""
        ns = self.ns(src["name"])
        r = e["result"]
        # A request may not outlive the time left for the expectation (within = S).
        timeout = 60.0 if left is None else max(1.0, left)
        if r in ("open", "closed"):
            out = self.probe(ns, who, mode="connect", host=host, port=port, timeout=CONNECT_TIMEOUT)
            return out.split()[0] == r, out
        if r == "tls-reject" and e["port"] == "cluster":
            out = self.probe(ns, who, **self.cluster_probe(e, src, dst, host, port))
            return out.startswith("rejected"), out
        if r == "tls-reject":
            out = self.probe(ns, who, mode="tls", host=host, port=port, ca=str(dst["_ca"]))
            return out.startswith("tls-reject"), out
        if r == "auth-required":
            anon = self.http(ns, who, host, port, dst["_ca"], "/v1/models", timeout=timeout)
            keyed = self.http(ns, who, host, port, dst["_ca"], "/v1/models", key=self.keys[dst["name"]], timeout=timeout)
            return (anon.get("status") == 401 and keyed.get("status") == 200,
                    f"without key: {anon.get('status') or anon.get('error')}, with key: {keyed.get('status') or keyed.get('error')}")
        if r == "unavailable":
            a = self.http(ns, who, host, port, dst["_ca"], "/v1/chat/completions", key=self.keys[dst["name"]],
                          body=chat_body(DEFAULT_PROMPT, 8), timeout=timeout)
            msg = openai_error(a.get("body", ""))
            return (a.get("status") == 503 and msg is not None,
                    f"status {a.get('status')}, body {a.get('body', a.get('error'))!r}"[:600])
        if r == "same-tokens":
            for p in prompts_of(e):
                a = self.http(ns, who, host, port, dst["_ca"], "/v1/chat/completions", key=self.keys[dst["name"]],
                              body=chat_body(p, SAME_TOKENS_MAX), timeout=timeout)
                if a.get("status") != 200:
                    return False, f"{p!r}: status {a.get('status')}, {a.get('body', a.get('error'))!r}"[:600]
                got, want = self.completion(a["body"]), self.reference[p]
                if got != want:
                    return False, f"{p!r}: got {got!r}\n      single node: {want!r}"
            return True, ""
        return False, f"unknown result {r}"

    def cluster_probe(self, e, src, dst, host, port):
        """The TLS 1.3 client for a cluster port, with the certificate `certificate` names."""
        if dst["role"] != "worker":
            raise ValueError(f"{dst['name']} has no cluster listener")
        choice = e.get("certificate", "cluster")
        cert = key = None
        if choice == "cluster":
            if src["role"] in ("head", "worker"):
                cert, key = src["_cert"], src["_key"]
        elif choice == "foreign":
            # The name the target accepts (its head's), from a CA the cluster does not trust.
            head = self.nodes[self.head]
            cert, key = self.foreign_cert(head["name"], head["address"])
        elif choice != "none":
            other = self.nodes.get(choice)
            if other is None or other["role"] not in ("head", "worker"):
                raise ValueError(f"certificate = {choice!r}: not cluster, none, foreign or a cluster node")
            cert, key = other["_cert"], other["_key"]
        return dict(mode="cluster", host=host, port=port, ca=str(self.ca_dir / "ca.pem"), alpn=CLUSTER_ALPN,
                    server_name=dst["name"], cert=str(cert) if cert else None, key=str(key) if key else None,
                    timeout=CONNECT_TIMEOUT, wait=CLUSTER_ACCEPT_WAIT)

    def fault(self, f):
        name, action = f["node"], f["action"]
        node = self.nodes[name]
        what = f"fault: {action} {name}"
        try:
            if action in ("kill", "start") and node["role"] not in ENGINE_ROLES:
                raise ValueError(f"{name} runs no engine")
            if action == "kill":
                node["_proc"].kill()
                node["_proc"].wait(15)
            elif action == "start":
                if node["_proc"].poll() is None:
                    raise RuntimeError(f"{name} is still running")
                self.start_node(name)
            else:
                # Cut (or restore) the node's link at its bridge port.
                sh("ip", "link", "set", node["_port"], "down" if action == "block" else "up", ns=self.switch)
            if action in ("kill", "start"):
                node["_stopped"] = action == "kill"
            self.record(what, True)
        except Exception as err:  # noqa: BLE001
            self.record(what, False, repr(err))
        for e in f.get("expect", []):
            self.check(e, context=f"after {action} {name}: ")

    def audit_apis(self):
        """`bulwark audit` against every API (engines and the head), from the first client node:
        every check passes."""
        clients = [n for n, node in self.nodes.items() if node["role"] == "client"]
        if not clients:
            return
        for name, node in self.nodes.items():
            if node["role"] not in ("engine", "head"):
                continue
            keyfile = self.tmp / f"{name}.key"
            keyfile.write_text(self.keys[name] + "\n")
            r = sh(self.bin, "audit", f"https://{node['address']}:{node['api_port']}", "--ca", node["_ca"],
                   "--api-key-file", keyfile, ns=self.ns(clients[0]), check=False)
            self.record(f"{clients[0]} -> {name}: bulwark audit passes every check", r.returncode == 0, r.stdout + r.stderr)

    def check_alive(self):
        """Every engine the faults did not kill is still running."""
        for name, node in self.nodes.items():
            if node["role"] in ENGINE_ROLES and "_proc" in node and not node.get("_stopped"):
                p = node["_proc"]
                self.record(f"{name}: engine still running", p.poll() is None,
                            f"exit status {p.returncode}\n" + node["_log"].read_text(errors="replace")[-3000:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("topology")
    ap.add_argument("--bin", default=str(ROOT / "target/release/bulwark"))
    demo = json.loads((ROOT / "scripts/demo-model.json").read_text())
    ap.add_argument("--model", default=str(ROOT / demo["dir"] / demo["file"]))
    ap.add_argument("--keep-logs", metavar="DIR", help="copy every engine's log and configuration to DIR")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("the lab needs root (network namespaces, nftables)")
    topo = tomllib.loads(Path(args.topology).read_text())
    # A previous run that was killed may have left namespaces behind.
    for line in sh("ip", "netns", "list").stdout.splitlines():
        if line.startswith(PREFIX + "-"):
            sh("ip", "netns", "del", line.split()[0], check=False)
    # SIGTERM (a CI timeout) unwinds like an exception, so the teardown still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        lab = Lab(topo, args.bin, args.model)
    except (ValueError, KeyError, TypeError) as e:
        sys.exit(f"{args.topology}: {e}")
    try:
        lab.run_reference()
        lab.up()
        for e in topo.get("expect", []):
            lab.check(e)
        lab.audit_apis()
        for f in topo.get("fault", []):
            lab.fault(f)
        lab.check_alive()
    except (Exception, KeyboardInterrupt, SystemExit) as e:  # noqa: BLE001
        lab.record("lab run", False, "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else repr(e))
    finally:
        if lab.failures:
            lab.show_logs()
        if args.keep_logs:
            lab.save_logs(args.keep_logs)
        lab.down()
    print(f"topology {topo['name']}: {'all checks passed' if not lab.failures else f'{len(lab.failures)} failed'}")
    sys.exit(1 if lab.failures else 0)


if __name__ == "__main__":
    main()

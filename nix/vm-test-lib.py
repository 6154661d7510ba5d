# The body of every topology VM test (nix/vm-test.nix prepends `import json`, TOPOLOGY,
# MACHINES, SECRETS, ENGINE_USER, REFERENCE_PORT and MODEL_NAME). It runs the topology the way vm-tests/lab.py
# does in network namespaces: every [[expect]] row, then every [[fault]] in order, each check
# in its own subtest, each isolation claim checked with a real connection.
import shlex
import time

NODES = {n["name"]: n for n in TOPOLOGY["nodes"]}
ENGINE_ROLES = ("engine", "head", "worker")
CONNECT_TIMEOUT = 2
DEFAULT_PROMPT = "What is the capital of France?"
_reference: dict = {}


def port_of(node, name):
    if name in ("api", "metrics", "cluster"):
        return node[f"{name}_port"]
    for svc in node.get("services", []):
        if svc["name"] == name:
            return svc["port"]
    raise KeyError(f"{node['name']} has no port named {name!r}")


def as_user(who, cmd):
    """`cmd` run as root (the default) or as the engine's unprivileged user."""
    if who == "engine-user":
        return f"setpriv --reuid={ENGINE_USER} --regid={ENGINE_USER} --clear-groups {cmd}"
    if who != "root":
        raise ValueError(f"as = {who!r}: expected root or engine-user")
    return cmd


def api_ca():
    return f"{SECRETS}/api-ca/ca.pem"


def api_key_of(node):
    return f"$(cat {SECRETS}/{node}/api-key)"


def body_file(who):
    return f"/tmp/body-{who}"


def curl(who, host, port, path, key_of=None, body=None):
    """An HTTPS request as `who`; prints the status, leaves the body in body_file(who)."""
    cmd = (
        f"curl --silent --show-error --max-time 60 --cacert {api_ca()}"
        f" -o {body_file(who)} -w '%{{http_code}}' https://{host}:{port}{path}"
    )
    if key_of is not None:
        cmd += f' -H "Authorization: Bearer {api_key_of(key_of)}"'
    if body is not None:
        cmd += f" -H 'Content-Type: application/json' --data {shlex.quote(body)}"
    return as_user(who, cmd)


def chat_body(prompt):
    return json.dumps(
        {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 24,
        }
    )


def client_certificate(e, src, dst):
    """The client certificate presented to a cluster port: a directory, or None."""
    cert = e.get("certificate")
    if cert is None:
        return f"{SECRETS}/{src['name']}/cluster" if src["role"] in ("head", "worker") else None
    if cert == "none":
        return None
    if cert == "cluster":
        return f"{SECRETS}/{src['name']}/cluster"
    if cert == "foreign":
        heads = [n for n in NODES.values() if n["role"] == "head"]
        accepted = heads[0]["name"] if dst["role"] == "worker" and heads else dst["name"]
        return f"{SECRETS}/foreign/{accepted}"
    if cert in NODES:
        return f"{SECRETS}/{cert}/cluster"
    raise ValueError(f"certificate = {cert!r}: expected cluster, none, foreign or a node name")


def eventually(machine, cmd, within, succeed=True):
    """Run a shell check once, or until it holds when the row carries `within`."""
    if within is None:
        return machine.succeed(cmd) if succeed else machine.fail(cmd)
    if succeed:
        return machine.wait_until_succeeds(cmd, timeout=within)
    return machine.wait_until_fails(cmd, timeout=within)


def reference_tokens(name, prompt):
    """The single-node answer: the same model, served by a plain engine on `name`'s loopback."""
    if (name, prompt) not in _reference:
        m = MACHINES[name]
        m.succeed("systemctl start bulwark-reference.service")
        m.wait_for_open_port(REFERENCE_PORT)
        body = shlex.quote(chat_body(prompt))
        _reference[(name, prompt)] = m.wait_until_succeeds(
            f"curl --silent --fail --max-time 120 http://127.0.0.1:{REFERENCE_PORT}/v1/chat/completions"
            f' -H "Authorization: Bearer {api_key_of(name)}" -H "Content-Type: application/json"'
            f" --data {body} | jq -er '.choices[0].message.content'",
            timeout=180,
        )
    return _reference[(name, prompt)]


def check(e):
    src, dst = NODES[e["from"]], NODES[e["to"]]
    machine = MACHINES[e["from"]]
    port = port_of(dst, e["port"])
    host = "127.0.0.1" if e.get("via", "address") == "loopback" else dst["address"]
    who = e.get("as", "root")
    result = e["result"]
    within = e.get("within")
    title = f"{e['from']} ({who}) -> {e['to']}:{e['port']} ({host}:{port}) is {result}"
    if within is not None:
        title += f" within {within} s"
    with subtest(title):
        tcp = as_user(who, f"nc -z -w {CONNECT_TIMEOUT} {host} {port}")
        if result == "open":
            eventually(machine, tcp, within)
        elif result == "closed":
            eventually(machine, tcp, within, succeed=False)
        elif result == "tls-reject":
            if e["port"] == "cluster":
                ca = f"{SECRETS}/cluster-ca/ca.pem"
                cert_dir = client_certificate(e, src, dst)
            else:
                ca, cert_dir = api_ca(), None
            probe = f"bulwark-lab-probe tls-reject {host} {port} {ca}"
            if cert_dir is not None:
                probe += f" {cert_dir}/cert.pem {cert_dir}/key.pem"
            eventually(machine, as_user(who, probe), within)
        elif result == "auth-required":
            anonymous = curl(who, host, port, "/v1/models")
            keyed = curl(who, host, port, "/v1/models", key_of=dst["name"])
            eventually(machine, f'test "$({anonymous})" = 401 && test "$({keyed})" = 200', within)
        elif result == "unavailable":
            request = curl(who, host, port, "/v1/chat/completions", key_of=dst["name"], body=chat_body(DEFAULT_PROMPT))
            eventually(machine, f'test "$({request})" = 503 && jq -e .error.message {body_file(who)}', within)
        elif result == "same-tokens":
            prompts = e.get("prompts", [e.get("prompt", DEFAULT_PROMPT)])
            for prompt in prompts:
                expected = reference_tokens(dst["name"], prompt)
                request = curl(who, host, port, "/v1/chat/completions", key_of=dst["name"], body=chat_body(prompt))
                got = eventually(
                    machine,
                    f'test "$({request})" = 200 && jq -er ".choices[0].message.content" {body_file(who)}',
                    within,
                )
                assert got == expected, f"{prompt!r}: multi-node answer {got!r} differs from single-node {expected!r}"
        else:
            raise ValueError(f"result = {result!r} is not one of the topology format's results")


def fault(index, f):
    machine = MACHINES[f["node"]]
    action = f["action"]
    with subtest(f"fault {index}: {action} {f['node']}"):
        if action == "kill":
            # A crash, not a clean stop: SIGKILL, then cancel the automatic restart.
            machine.succeed("systemctl kill --signal=SIGKILL bulwark.service")
            machine.succeed("systemctl stop bulwark.service")
        elif action == "start":
            machine.succeed("systemctl start bulwark.service")
            machine.wait_for_unit("bulwark.service")
        elif action == "block":
            machine.block()
        elif action == "unblock":
            machine.unblock()
        else:
            raise ValueError(f"fault action {action!r}: expected kill, start, block or unblock")
    for e in f.get("expect", []):
        check(e)


def wait_until_serving():
    # Workers first: a head needs its stages to serve.
    order = sorted(NODES.values(), key=lambda n: {"worker": 0, "head": 1}.get(n["role"], 2))
    for node in order:
        machine = MACHINES[node["name"]]
        for svc in node.get("services", []):
            machine.wait_for_open_port(svc["port"])
        if node["role"] not in ENGINE_ROLES:
            continue
        with subtest(f"{node['name']}: bulwark is up"):
            if node.get("firewall", True):
                machine.wait_for_unit("bulwark-firewall.service")
            machine.wait_for_unit("bulwark.service")
            if node["role"] == "worker":
                machine.wait_for_open_port(node["cluster_port"], addr=node["address"], timeout=300)
            else:
                machine.wait_for_open_port(node["api_port"], addr=node["address"], timeout=300)
                # The port is bound before the model loads: ready when /health answers (a
                # connection waits in the listen backlog until then).
                machine.wait_until_succeeds(
                    f"curl --silent --fail --max-time 5 --cacert {api_ca()}"
                    f' -H "Authorization: Bearer {api_key_of(node["name"])}"'
                    f" https://{node['address']}:{node['api_port']}/health",
                    timeout=300,
                )


start = time.monotonic()
start_all()
wait_until_serving()
for row in TOPOLOGY.get("expect", []):
    check(row)
for i, f in enumerate(TOPOLOGY.get("fault", []), start=1):
    fault(i, f)
print(f"topology {TOPOLOGY['name']}: every check passed in {time.monotonic() - start:.0f} s")

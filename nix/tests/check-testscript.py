"""Lint a VM test's script the way the NixOS test driver does (nixos/lib/testing/driver.nix,
`skipLint`): pyflakes, with the driver's globals and the machines' names as builtins.

  check-testscript.py EVAL.json   (the output of nix/tests/eval-vm-test.nix)
"""
import json
import os
import re
import subprocess
import sys
import tempfile

# nixos/lib/test-driver/src/test_driver/driver.py: Driver.test_symbols().
DRIVER_GLOBALS = [
    "start_all", "test_script", "machines", "vlans", "driver", "log", "os",
    "create_machine", "subtest", "run_tests", "join_all", "retry",
    "serial_stdout_off", "serial_stdout_on", "polling_condition", "Machine", "t",
    "debug", "dump_machine_ssh",
]


def pythonize(name):
    # nixos/lib/test-driver: machine names become Python identifiers.
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def main(path):
    ev = json.load(open(path))
    names = [pythonize(m) for m in ev["machines"]]
    if len(names) == 1:
        names.append("machine")
    vlan_names = ["vlan1"]
    env = dict(os.environ, PYFLAKES_BUILTINS=",".join(DRIVER_GLOBALS + names + vlan_names))
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(ev["testScript"])
    try:
        r = subprocess.run([sys.executable, "-m", "pyflakes", f.name], env=env, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    out = (r.stdout + r.stderr).replace(f.name, ev["name"])
    if r.returncode != 0:
        sys.exit(out or "pyflakes failed")


if __name__ == "__main__":
    main(sys.argv[1])

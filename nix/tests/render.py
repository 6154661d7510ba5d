"""Render what services.bulwark evaluates to (nix/tests/eval-module.nix's JSON) into files.

  render.py unit EVAL.json SERVICE OUT.service   the unit as NixOS would write it (approximately:
                                                  lists as repeated keys, booleans as true/false)
  render.py toml EVAL.json OUT.toml [KEY=VALUE]   the configuration, with optional overrides of
                                                  dotted keys (e.g. firewall.engine_user=65534)
"""
import json
import sys

UNIT_KEYS = {
    "description": "Description",
    "after": "After",
    "before": "Before",
    "wants": "Wants",
    "requires": "Requires",
    "partOf": "PartOf",
}


def value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def unit(ev, name):
    s = ev["services"][name]
    lines = ["[Unit]"]
    for key, unit_key in UNIT_KEYS.items():
        v = s.get(key)
        if v:
            lines.append(f"{unit_key}={' '.join(v) if isinstance(v, list) else v}")
    for k, v in sorted(s.get("unitConfig", {}).items()):
        for item in v if isinstance(v, list) else [v]:
            lines.append(f"{k}={value(item)}")
    lines.append("")
    lines.append("[Service]")
    for k, v in sorted(s["serviceConfig"].items()):
        for item in v if isinstance(v, list) else [v]:
            lines.append(f"{k}={value(item)}")
    if s.get("wantedBy"):
        lines += ["", "[Install]", f"WantedBy={' '.join(s['wantedBy'])}"]
    return "\n".join(lines) + "\n"


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no inline TOML for {v!r}")


def toml_key(k):
    """A bare key when TOML allows one, else quoted (`"config.json"` is one key, not two)."""
    bare = k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k)
    return k if bare else json.dumps(k)


def toml(doc, prefix=()):
    """A small TOML writer for what settings can hold: tables, arrays of tables, scalars, lists."""
    out, tables = [], []
    for k, v in doc.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.append((k, v))
        else:
            out.append(f"{toml_key(k)} = {toml_value(v)}")
    for k, v in tables:
        path = ".".join(toml_key(p) for p in prefix + (k,))
        if isinstance(v, dict):
            out += ["", f"[{path}]", toml(v, prefix + (k,))]
        else:
            for item in v:
                out += ["", f"[[{path}]]", toml(item, prefix + (k,))]
    return "\n".join(line for line in out if line is not None).strip("\n")


def main(argv):
    kind, ev = argv[1], json.load(open(argv[2]))
    if kind == "unit":
        open(argv[4], "w").write(unit(ev, argv[3]))
    elif kind == "toml":
        settings = ev["settings"]
        for override in argv[4:]:
            key, v = override.split("=", 1)
            *parents, last = key.split(".")
            d = settings
            for p in parents:
                d = d.setdefault(p, {})
            d[last] = v
        open(argv[3], "w").write(toml(settings) + "\n")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)

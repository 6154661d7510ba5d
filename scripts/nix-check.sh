#!/usr/bin/env bash
# The Nix checks that run without Nix builds (docs/nix.md): every .nix file parses (Debian's
# nix-bin); with NIXPKGS_LIB pointing at nixpkgs' lib (nix-community/nixpkgs.lib, never
# committed), services.bulwark and every topology's VM test evaluate against option stubs, bad
# settings fail, the test scripts pass pyflakes, the firewall the module would apply passes
# `nft -c`, and the unit's systemd exposure score is at most 1.0. One line per check, then
# `N passed, N failed, N skipped`; exit 1 on any failure. Run as root on Debian 12.
set -uo pipefail
cd "$(dirname "$0")/.."

THRESHOLD=1.0
BIN=${BULWARK_BIN:-target/release/bulwark}
passed=0 failed=0 skipped=0
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

pass() { echo "PASS  $1"; passed=$((passed + 1)); }
fail() { echo "FAIL  $1"; [ -n "${2:-}" ] && sed 's/^/      /' <<<"$2" | head -25; failed=$((failed + 1)); }
skip() { echo "SKIP  $1 ($2)"; skipped=$((skipped + 1)); }
# check NAME COMMAND...: pass when the command succeeds, fail with its output otherwise.
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$out"; fi
}

# --- what the checks need, installed once -------------------------------------------------
if ! command -v nix-instantiate >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nix-bin >/dev/null 2>&1 \
    || { apt-get update >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nix-bin >/dev/null 2>&1; }
fi
PY=.venv/bin/python
[ -x "$PY" ] || python3 -m venv .venv
"$PY" -c 'import pyflakes' 2>/dev/null || "$PY" -m pip install --quiet pyflakes >/dev/null 2>&1
NIX=(nix-instantiate --store dummy://)

# --- syntax: every .nix file, flake.nix included --------------------------------------------
while IFS= read -r f; do
  check "parse $f" "${NIX[@]}" --parse "$f"
done < <(git ls-files --cached --others --exclude-standard '*.nix' | sort)
check "flake.lock is a version 7 lock with a pinned nixpkgs" python3 -c '
import json, sys
lock = json.load(open("flake.lock"))
n = lock["nodes"]["nixpkgs"]["locked"]
assert lock["version"] == 7 and lock["nodes"]["root"]["inputs"]["nixpkgs"] == "nixpkgs", lock
assert n["type"] == "github" and len(n["rev"]) == 40 and n["narHash"].startswith("sha256-"), n'

# --- evaluation against nixpkgs' lib ---------------------------------------------------------
LIB_STEPS=(
  "module: services.bulwark evaluates (single, head, worker)"
  "module: bad settings fail (misspelled option, secrets in the store, ...)"
  "vm tests: every topology's nodes evaluate"
  "vm tests: every testScript (topologies and scenarios) passes pyflakes with the driver's globals"
  "vm tests: pyflakes catches a misspelled machine name"
  "module: rendered configuration passes bulwark check-config"
  "module: the firewall it applies passes nft -c"
  "module: exposure of bulwark.service (CPU node) at most $THRESHOLD"
)
if [ -z "${NIXPKGS_LIB:-}" ]; then
  for s in "${LIB_STEPS[@]}"; do skip "$s" "NIXPKGS_LIB unset"; done
else
  LIB=(--arg lib "import $(realpath "$NIXPKGS_LIB")")
  eval_module() { "${NIX[@]}" --eval --strict --json nix/tests/eval-module.nix "${LIB[@]}" --argstr kind "$1" --argstr case "$2"; }

  for c in single head worker directory; do
    check "module: services.bulwark evaluates ($c)" eval_module good "$c"
    eval_module good "$c" >"$WORK/$c.json" 2>/dev/null
  done

  bad_cases=$("${NIX[@]}" --eval --strict --json -E "builtins.attrNames (import ./nix/tests/module-cases.nix).bad" | tr -d '[]"' | tr ',' ' ')
  for c in $bad_cases; do
    expect=$("${NIX[@]}" --eval --raw -E "(import ./nix/tests/module-cases.nix).bad.\"$c\".expect" 2>/dev/null \
      || "${NIX[@]}" --eval --json -E "(import ./nix/tests/module-cases.nix).bad.\"$c\".expect" | python3 -c 'import json,sys; print(json.load(sys.stdin))')
    if out=$(eval_module bad "$c" 2>&1); then
      fail "module: $c is refused" "it evaluated: $out"
    elif grep -qF -- "$expect" <<<"$out"; then
      pass "module: $c is refused ($expect)"
    else
      fail "module: $c is refused, naming: $expect" "$out"
    fi
  done

  for t in vm-tests/topologies/*.toml; do
    name=$(basename "$t" .toml)
    check "vm test $name: nodes evaluate" \
      "${NIX[@]}" --eval --strict --json nix/tests/eval-vm-test.nix "${LIB[@]}" --arg topologyFile "./$t"
    "${NIX[@]}" --eval --strict --json nix/tests/eval-vm-test.nix "${LIB[@]}" --arg topologyFile "./$t" >"$WORK/vm-$name.json" 2>/dev/null
    check "vm test $name: testScript passes pyflakes" "$PY" nix/tests/check-testscript.py "$WORK/vm-$name.json"
  done
  for f in vm-tests/*.nix; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .nix)
    if "${NIX[@]}" --eval --strict --json nix/tests/eval-scenario.nix "${LIB[@]}" --arg file "./$f" >"$WORK/scenario-$name.json" 2>"$WORK/err"; then
      check "vm test $name (scenario): testScript passes pyflakes" "$PY" nix/tests/check-testscript.py "$WORK/scenario-$name.json"
    else
      fail "vm test $name (scenario): evaluates" "$(cat "$WORK/err")"
    fi
  done
  # The lint must be able to fail: a machine that does not exist.
  first=$(ls vm-tests/topologies/*.toml | head -1)
  python3 - "$WORK/vm-$(basename "$first" .toml).json" "$WORK/typo.json" <<'PY'
import json, sys
ev = json.load(open(sys.argv[1]))
ev["testScript"] += "\nno_such_machne.succeed('true')\n"
json.dump(ev, open(sys.argv[2], "w"))
PY
  if out=$("$PY" nix/tests/check-testscript.py "$WORK/typo.json" 2>&1); then
    fail "vm tests: pyflakes catches a misspelled machine name" "it passed"
  else
    pass "vm tests: pyflakes catches a misspelled machine name ($(grep -o "undefined name '[a-z_]*'" <<<"$out"))"
  fi

  # The configuration the module renders, as the server and the firewall command see it. This
  # host has no `bulwark` user or group, so the egress rule names the ids 990 instead.
  for c in single head worker directory; do
    python3 nix/tests/render.py toml "$WORK/$c.json" "$WORK/$c.toml" firewall.engine_user=990 sandbox.group=990
  done
  if [ ! -x "$BIN" ]; then
    skip "module: rendered configuration passes bulwark check-config" "no $BIN"
    skip "module: the firewall it applies passes nft -c" "no $BIN"
  else
    for c in single head worker directory; do
      if out=$("$BIN" check-config --config "$WORK/$c.toml" 2>&1); then
        pass "module: rendered configuration passes bulwark check-config ($c)"
      elif [ "$c" != single ] && grep -q 'unknown field `cluster`' <<<"$out"; then
        skip "module: rendered configuration passes bulwark check-config ($c)" "this binary has no [cluster] yet"
      else
        fail "module: rendered configuration passes bulwark check-config ($c)" "$out"
      fi
    done
    for c in single head worker; do
      name="module: the firewall it applies passes nft -c ($c)"
      if ! out=$("$BIN" firewall print --config "$WORK/$c.toml" 2>&1); then
        if [ "$c" != single ] && grep -q 'unknown field `cluster`' <<<"$out"; then
          skip "$name" "this binary has no [cluster] yet"
        else
          fail "$name" "$out"
        fi
        continue
      fi
      printf '%s\n' "$out" >"$WORK/$c.nft"
      check "$name" unshare -n nft -c -f "$WORK/$c.nft"
    done
  fi

  for c in single head worker; do
    python3 nix/tests/render.py unit "$WORK/$c.json" bulwark "$WORK/$c-bulwark.service"
    score=$(cd "$WORK" && systemd-analyze security --offline=true "$c-bulwark.service" 2>&1 \
      | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    name="module: exposure of bulwark.service ($c) is ${score:-?}, at most $THRESHOLD"
    if [ -n "$score" ] && python3 -c "import sys; sys.exit(0 if $score <= $THRESHOLD else 1)"; then
      pass "$name"
    else
      fail "$name" "$(cd "$WORK" && systemd-analyze security --offline=true "$c-bulwark.service" 2>&1 | grep -v '^✓')"
    fi
  done
fi

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]

# The name, machines and test script of a hand-written scenario (vm-tests/*.nix), for the
# pyflakes check. Its nodes need the whole of NixOS (profiles, boot, images), so they are not
# evaluated here; `nix flake check` builds them.
{
  lib,
  file,
}:

let
  pkgs = import ./pkgs-stub.nix lib;
  test = import file {
    inherit lib pkgs;
    demoModel = pkgs.runCommand "SmolLM2-135M-Instruct.Q4_1.gguf" { } "";
    bulwarkModule = ../../nixos-modules/bulwark.nix;
    applianceModule = ../../nixos-modules/appliance.nix;
  };
in
{
  inherit (test) name testScript;
  machines = lib.attrNames test.nodes;
}

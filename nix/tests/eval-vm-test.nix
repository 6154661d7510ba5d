# Evaluates the VM test generated from one topology file (nix/vm-test.nix) against nixpkgs'
# lib and the option stubs: every node's configuration (with services.bulwark, assertions
# checked), its address, and the test script (linted separately with pyflakes).
#   nix-instantiate --store dummy:// --eval --strict --json nix/tests/eval-vm-test.nix \
#     --arg lib "import $NIXPKGS_LIB" --arg topologyFile ./vm-tests/topologies/single.toml
{
  lib,
  topologyFile,
}:

let
  pkgs = import ./pkgs-stub.nix lib;
  topology = builtins.fromTOML (builtins.readFile topologyFile);
  demo = builtins.fromJSON (builtins.readFile ../../scripts/demo-model.json);
  demoModel = pkgs.runCommand demo.file { inherit (demo) sha256; } "";
  test = import ../vm-test.nix {
    inherit lib pkgs topology demoModel;
    bulwark = pkgs.bulwark;
    bulwarkModule = ../../nixos-modules/bulwark.nix;
  };
  evalNode =
    name: module:
    let
      cfg =
        (lib.evalModules {
          modules = [
            ./stubs.nix
            { _module.args.pkgs = pkgs; }
            module
          ];
        }).config;
      failed = map (a: a.message) (lib.filter (a: !a.assertion) cfg.assertions);
      bulwark = cfg.services.bulwark or { enable = false; };
    in
    if failed != [ ] then
      throw "node ${name}: failed assertions:\n- ${lib.concatStringsSep "\n- " failed}"
    else
      {
        addresses = map (a: "${a.address}/${toString a.prefixLength}") cfg.networking.interfaces.eth1.ipv4.addresses;
        vlans = cfg.virtualisation.vlans;
        units = lib.attrNames cfg.systemd.services;
        firewall = cfg.networking.firewall.enable;
        nftables = cfg.networking.nftables.enable;
      }
      // lib.optionalAttrs bulwark.enable {
        settings = cfg.environment.etc."bulwark/bulwark.toml".source.uncheckedConfig.value;
        services = lib.mapAttrs (_: s: {
          inherit (s) serviceConfig;
        }) (lib.filterAttrs (n: _: lib.hasPrefix "bulwark" n) cfg.systemd.services);
      };
in
{
  inherit (test) name testScript;
  machines = lib.attrNames test.nodes;
  nodes = lib.mapAttrs evalNode test.nodes;
}

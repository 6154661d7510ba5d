# Evaluates services.bulwark against nixpkgs' lib and the option stubs; prints what the module
# renders, or fails with the assertion messages.
#   nix-instantiate --store dummy:// --eval --strict --json nix/tests/eval-module.nix \
#     --arg lib "import $NIXPKGS_LIB" --argstr kind good --argstr case single
{
  lib,
  kind,
  case,
}:

let
  pkgs = import ./pkgs-stub.nix lib;
  cases = import ./module-cases.nix;
  chosen = cases.${kind}.${case};
  eval = lib.evalModules {
    modules = [
      ./stubs.nix
      ../../nixos-modules/bulwark.nix
      { _module.args.pkgs = pkgs; }
      (if kind == "good" then chosen else chosen.module)
    ];
  };
  cfg = eval.config;
  failed = map (a: a.message) (lib.filter (a: !a.assertion) cfg.assertions);
  unit = s: {
    inherit (s)
      serviceConfig
      unitConfig
      after
      before
      wants
      requires
      requiredBy
      wantedBy
      partOf
      description
      ;
  };
in
if failed != [ ] then
  throw "failed assertions:\n- ${lib.concatStringsSep "\n- " failed}"
else
  {
    settings = cfg.environment.etc."bulwark/bulwark.toml".source.uncheckedConfig.value;
    services = lib.mapAttrs (_: unit) cfg.systemd.services;
    allowedTCPPorts = cfg.networking.firewall.allowedTCPPorts;
    nftables = cfg.networking.nftables.enable;
  }

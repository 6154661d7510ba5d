# Stub declarations of the NixOS options that services.bulwark, the appliance-free VM test
# nodes and the test harness set, so that they evaluate with nixpkgs' `lib` alone (no nixpkgs
# tree, no NixOS) under Debian's Nix 2.8. Each stub names the nixpkgs file that declares the
# real option. Strict on purpose: there is no top-level freeformType, and the unit submodule
# declares its attributes one by one, so a misspelled option anywhere fails the evaluation
# ("The option `services.bulwark.setings' does not exist").
#
# What the stubs do not prove: that the real options accept these values (serviceConfig is
# freeform here; in NixOS each value becomes unit-file text). `nix flake check` proves that.
{ lib, ... }:

let
  inherit (lib) mkOption types;
  # Nested attribute sets that merge like NixOS's own (mkIf/mkDefault/mkForce still apply at
  # every level); lists and strings must agree when defined twice.
  free = types.attrsOf types.anything;
  opt = type: default: mkOption { inherit type default; };
  strs = opt (types.listOf types.str) [ ];

  # nixos/modules/system/boot/systemd.nix (services) with the unit options of
  # nixos/lib/systemd-unit-options.nix (stage2ServiceOptions, commonUnitOptions).
  unit = types.submodule {
    options = {
      enable = opt types.bool true;
      description = opt types.str "";
      documentation = strs;
      wantedBy = strs;
      requiredBy = strs;
      before = strs;
      after = strs;
      wants = strs;
      requires = strs;
      partOf = strs;
      bindsTo = strs;
      conflicts = strs;
      unitConfig = opt free { };
      serviceConfig = opt free { };
      environment = opt (types.attrsOf types.str) { };
      path = opt (types.listOf types.anything) [ ];
      restartTriggers = opt (types.listOf types.anything) [ ];
      reloadTriggers = opt (types.listOf types.anything) [ ];
      script = opt types.lines "";
      preStart = opt types.lines "";
      postStart = opt types.lines "";
    };
  };

  # nixos/modules/tasks/network-interfaces.nix (networking.interfaces.<name>.ipv4.addresses).
  address = types.submodule {
    options = {
      address = mkOption { type = types.str; };
      prefixLength = mkOption { type = types.ints.between 0 128; };
    };
  };
  interface = types.submodule {
    options = {
      ipv4.addresses = opt (types.listOf address) [ ];
      ipv6.addresses = opt (types.listOf address) [ ];
    };
  };
in
{
  options = {
    # nixos/modules/misc/assertions.nix
    assertions = opt (types.listOf free) [ ];
    warnings = strs;

    systemd.services = opt (types.attrsOf unit) { };

    # nixos/modules/config/users-groups.nix
    users.users = opt (types.attrsOf (
      types.submodule {
        options = {
          isSystemUser = opt types.bool false;
          group = opt types.str "";
          description = opt types.str "";
          uid = opt (types.nullOr types.int) null;
        };
      }
    )) { };
    users.groups = opt (types.attrsOf (
      types.submodule { options.gid = opt (types.nullOr types.int) null; }
    )) { };

    # nixos/modules/system/etc/etc.nix
    environment.etc = opt (types.attrsOf (
      types.submodule {
        options = {
          source = opt types.anything null;
          text = opt (types.nullOr types.lines) null;
          mode = opt types.str "symlink";
        };
      }
    )) { };
    # nixos/modules/config/system-path.nix
    environment.systemPackages = opt (types.listOf types.anything) [ ];

    # nixos/modules/services/networking/nftables.nix
    networking.nftables.enable = opt types.bool false;
    # nixos/modules/services/networking/firewall.nix
    networking.firewall.enable = opt types.bool true;
    networking.firewall.allowedTCPPorts = opt (types.listOf types.port) [ ];
    # nixos/modules/tasks/network-interfaces.nix
    networking.hostName = opt types.str "nixos";
    networking.interfaces = opt (types.attrsOf interface) { };
    networking.primaryIPAddress = opt types.str "";
    networking.primaryIPv6Address = opt types.str "";

    # nixos/modules/virtualisation/qemu-vm.nix
    virtualisation.vlans = opt (types.listOf types.ints.unsigned) [ 1 ];
    virtualisation.memorySize = opt types.ints.positive 1024;
    virtualisation.cores = opt types.ints.positive 1;
  };
}

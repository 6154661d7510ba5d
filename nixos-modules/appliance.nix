# The Bulwark appliance: a profile for an image-based machine that does one thing.
#
# Minimal (no Nix daemon, no compilers, no documentation, no installer tools), users and /etc
# immutable, the store read-only, a serial console, and Bulwark serving the demo model from the
# first boot. The first boot creates the TLS certificate and an API key, prints the key once on
# the console, and keeps only its hash. Import together with services.bulwark (the flake's
# nixosModules.bulwark); the flake builds it as nixosConfigurations.appliance and the qcow2
# image as packages.x86_64-linux.appliance-image.
{
  config,
  lib,
  pkgs,
  modulesPath,
  ...
}:

let
  inherit (lib) mkDefault;
  cfg = config.services.bulwark;
  demoModel = pkgs.callPackage ../nix/demo-model.nix { };
  secretsDir = "/var/lib/bulwark-secrets";
in
{
  imports = [ "${modulesPath}/profiles/minimal.nix" ];

  services.bulwark = {
    enable = true;
    model = {
      file = mkDefault demoModel;
      sha256 = mkDefault demoModel.sha256;
      name = mkDefault demoModel.modelName;
    };
    apiKeysFile = mkDefault "${secretsDir}/keys";
    tls.certificateFile = mkDefault "${secretsDir}/cert.pem";
    tls.keyFile = mkDefault "${secretsDir}/key.pem";
    openFirewall = mkDefault true;
    settings.server.listen = mkDefault "0.0.0.0:8443";
  };

  # First boot: a self-signed certificate for the listener and one API key, made by
  # `bulwark init` and moved into place. The key is written only to the console (once); the
  # machine keeps its hash. Add keys later with `bulwark keys new --keys-file .../keys`.
  systemd.services.bulwark-first-boot = {
    description = "Bulwark first boot: TLS certificate and API key";
    wantedBy = [ "multi-user.target" ];
    requiredBy = [ "bulwark.service" ];
    before = [ "bulwark.service" ];
    unitConfig.ConditionPathExists = "!${secretsDir}/keys";
    path = [
      cfg.package
      pkgs.coreutils
    ];
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
      UMask = "0077";
      StandardOutput = "journal+console";
    };
    script = ''
      set -euo pipefail
      work=$(mktemp -d)
      trap 'rm -rf "$work"' EXIT
      bulwark init --dir "$work/init" --model ${cfg.model.file} \
        --listen ${cfg.settings.server.listen} --name ${lib.escapeShellArg cfg.model.name} > "$work/out"
      install -d -m 0700 ${secretsDir}
      install -m 0644 "$work/init/cert.pem" ${secretsDir}/cert.pem
      install -m 0600 "$work/init/key.pem" ${secretsDir}/key.pem
      key=$(sed -n 's/^api key: //p' "$work/out")
      # The keys file last: its presence marks first boot as done.
      install -m 0600 "$work/init/keys" ${secretsDir}/keys
      echo "bulwark: first boot created ${secretsDir}/{cert.pem,key.pem,keys}"
      echo "bulwark: certificate SHA-256 fingerprint: $(sha256sum ${secretsDir}/cert.pem | cut -d' ' -f1)"
      {
        echo "bulwark: the API key, shown only here and only once (the machine keeps its hash):"
        echo "bulwark: $key"
      } > /dev/console
      echo "bulwark: the API key was printed once on the console; it is not stored anywhere"
    '';
  };

  # No Nix on the machine: it is rebuilt from the flake and re-imaged, never changed in place.
  nix.enable = false;
  system.disableInstallerTools = true;
  environment.defaultPackages = [ ];
  programs.command-not-found.enable = false;
  boot.enableContainers = false;
  security.sudo.enable = false;

  # Users and /etc are part of the image: no passwd, no useradd, no edits that survive a reboot.
  users.mutableUsers = false;
  users.users.root.hashedPassword = mkDefault "!";
  services.userborn.enable = mkDefault true;
  boot.initrd.systemd.enable = mkDefault true;
  system.etc.overlay = {
    enable = mkDefault true;
    mutable = mkDefault false;
  };
  # The store is mounted read-only by NixOS's default (boot.readOnlyNixStore).

  # Serial console (the machine has no screen): kernel, boot loader and a getty on ttyS0.
  boot.kernelParams = [ "console=ttyS0,115200n8" ];
  boot.loader.grub.extraConfig = ''
    serial --unit=0 --speed=115200
    terminal_input serial console
    terminal_output serial console
  '';
  boot.loader.timeout = mkDefault 1;

  # Networking with systemd-networkd (DHCP); /etc stays read-only.
  networking.useNetworkd = mkDefault true;
  networking.hostName = mkDefault "bulwark";

  # The root file system and boot loader of the qemu image (system.build.images.qemu sets the
  # same values with a higher priority); these let the bare configuration evaluate too.
  fileSystems."/" = mkDefault {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
    autoResize = true;
  };
  boot.loader.grub.devices = mkDefault [ "/dev/vda" ];
  boot.growPartition = mkDefault true;

  system.stateVersion = mkDefault "26.05";
}

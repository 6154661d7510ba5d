{
  description = "Bulwark: a secure-by-default LLM inference server, its NixOS module and appliance";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  # The flake wires; the logic lives in nix/ and nixos-modules/ (docs/nix.md).
  outputs =
    { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      inherit (nixpkgs) lib;
    in
    {
      packages.${system} = {
        bulwark = pkgs.callPackage ./nix/package.nix {
          version = (lib.importTOML ./Cargo.toml).workspace.package.version;
          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./Cargo.toml
              ./Cargo.lock
              ./engine
              ./firewall
              ./sandbox
            ];
          };
        };
        default = self.packages.${system}.bulwark;
        demo-model = pkgs.callPackage ./nix/demo-model.nix { };
        # A qcow2 disk image (BIOS, GRUB) that boots under QEMU:
        #   qemu-system-x86_64 -enable-kvm -m 2048 -nographic \
        #     -drive file=result/nixos-*.qcow2,snapshot=on -nic user,hostfwd=tcp::8443-:8443
        appliance-image = self.nixosConfigurations.appliance.config.system.build.images.qemu;
      };

      # services.bulwark, with this flake's package as the default `package` (runNixOSTest
      # nodes cannot add overlays, so the package is not taken from `pkgs`).
      nixosModules = {
        bulwark = import ./nix/module-with-package.nix self;
        default = self.nixosModules.bulwark;
        appliance = import ./nixos-modules/appliance.nix;
      };

      nixosConfigurations.appliance = nixpkgs.lib.nixosSystem {
        modules = [
          self.nixosModules.bulwark
          self.nixosModules.appliance
          { nixpkgs.hostPlatform = system; }
        ];
      };

      checks.${system} = import ./nix/checks.nix {
        inherit pkgs self;
        bulwark = self.packages.${system}.bulwark;
      };

      devShells.${system}.default = pkgs.mkShell {
        inputsFrom = [ self.packages.${system}.bulwark ];
        packages = [
          pkgs.clippy
          pkgs.rustfmt
          pkgs.nftables
          pkgs.nixfmt
        ];
      };

      formatter.${system} = pkgs.nixfmt;
    };
}

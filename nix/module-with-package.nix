# services.bulwark with the flake's own package as the default for `services.bulwark.package`
# (the module itself defaults to `pkgs.bulwark`, as nixpkgs modules do).
self:
{ lib, pkgs, ... }:
{
  imports = [ ../nixos-modules/bulwark.nix ];
  services.bulwark.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.bulwark;
}
